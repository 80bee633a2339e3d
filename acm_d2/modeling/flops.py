"""FLOP counting of models with context modules with fvcore's (or Detectron2's) FlopCountAnalysis.

fvcore traces the model: ACM is recorded as its fused inference computation for contiguous
inputs (batched matrix products for the logits and the pooling, see acm_function.py) and as
plain PyTorch ops (grouped convolutions) for channels_last ones. fvcore counts the
convolutions and matrix products, but has no handle for the ops below, which it would skip
with a warning: one multiply-add per element of the output (``addcmul``: Y = P * X + P * (K -
Q)), one add per element of the input (``mean``: mu; ``sum``: the sums of the maps'
exponentials), one comparison per element of the input (``amax``: the logits' maxima, CBAM's
max-poolings), and ``baddbmm`` as fvcore counts ``bmm``. Elementwise ops (add, mul, sigmoid,
softmax, ...) stay uncounted, as Detectron2's FlopCountAnalysis leaves them for every model.
"""
from fvcore.nn.jit_handles import get_shape

__all__ = ["ACM_FLOP_HANDLES", "add_acm_flop_handles"]


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _baddbmm_flop_jit(inputs, outputs) -> int:
    """``baddbmm(bias, batch1 (B, n, k), batch2 (B, k, m))``: B * n * k * m multiply-adds."""
    batch, rows, inner = get_shape(inputs[1])
    return batch * rows * inner * get_shape(inputs[2])[-1]


def _output_elements_flop_jit(inputs, outputs) -> int:
    """One (multiply-)add per element of the output (``addcmul``)."""
    return _numel(get_shape(outputs[0]))


def _input_elements_flop_jit(inputs, outputs) -> int:
    """One add (``mean``, ``sum``) or comparison (``amax``) per element of the input."""
    return _numel(get_shape(inputs[0]))


#: fvcore op name -> handle, for ``FlopCountAnalysis.set_op_handle``.
ACM_FLOP_HANDLES = {
    "aten::baddbmm": _baddbmm_flop_jit,
    "aten::addcmul": _output_elements_flop_jit,
    "aten::mean": _input_elements_flop_jit,
    "aten::sum": _input_elements_flop_jit,
    "aten::amax": _input_elements_flop_jit,
}


def add_acm_flop_handles(analysis):
    """Register :data:`ACM_FLOP_HANDLES` on a FlopCountAnalysis; returns the analysis.

    Example: ``add_acm_flop_handles(FlopCountAnalysis(model, inputs)).total()``.
    """
    return analysis.set_op_handle(**ACM_FLOP_HANDLES)
