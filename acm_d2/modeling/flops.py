"""FLOP counting of ACM models with fvcore's (or Detectron2's) FlopCountAnalysis.

ACM's fused products are ``aten::baddbmm`` calls, for which fvcore has no handle: without
the handle below FlopCountAnalysis skips them and undercounts ACM.
"""
from fvcore.nn.jit_handles import get_shape

__all__ = ["baddbmm_flop_jit", "add_acm_flop_handles"]


def baddbmm_flop_jit(inputs, outputs) -> int:
    """FLOPs of ``baddbmm(bias, batch1 (B, n, k), batch2 (B, k, m))``: B * n * k * m
    multiply-adds, counted as fvcore counts ``bmm``."""
    batch, rows, inner = get_shape(inputs[1])
    return batch * rows * inner * get_shape(inputs[2])[-1]


def add_acm_flop_handles(analysis):
    """Register the handles ACM needs on a FlopCountAnalysis; returns the analysis.

    Example: ``add_acm_flop_handles(FlopCountAnalysis(model, inputs)).total()``.
    """
    return analysis.set_op_handle("aten::baddbmm", baddbmm_flop_jit)
