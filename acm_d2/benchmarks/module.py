"""One ACM against its plain-ops formulation, the authors' module and the floor, used by
``tools/benchmark.py`` (see docs/benchmark.md; timing as in :mod:`acm_d2.benchmarks.timing`).

:func:`bench_modules`: one ACM at the ResNet-50 stage shapes of an 800x1216 image, batch 1
and 2, contiguous and channels_last, inference (no grad) and training (forward+backward
through Y and the orthogonality term), against the simplest plain-ops formulation
(:func:`acm_d2.modeling.acm_function.attend_and_compare_ops` run eagerly), the literal
:class:`acm_d2.ReferenceACM` (the authors' formulation) and the floor (one ``X * s`` pass).
"""
import gc
import logging
from typing import Callable, Dict, List, Sequence

import torch

from ..modeling.acm import ACM
from ..modeling.acm_function import attend_and_compare, attend_and_compare_ops
from ..modeling.reference import ReferenceACM
from .timing import run_interleaved, saved_bytes_over_input

__all__ = ["bench_modules", "reference_like"]

logger = logging.getLogger(__name__)


def _random_acm(channels: int, groups: int, device: torch.device, seed: int = 0) -> ACM:
    torch.manual_seed(seed)
    module = ACM(channels, groups=groups).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def reference_like(module: ACM) -> ReferenceACM:
    """A :class:`ReferenceACM` with the weights of a full ACM (K = add_mod, Q = sub_mod, P =
    mul_mod; the reference's logits biases stay zero)."""
    ref = ReferenceACM(module.channels, module.groups).to(module.kq_logits.weight.device)
    with torch.no_grad():
        ref.add_mod.map_gen[0].weight.copy_(module.kq_logits.weight[0::2])
        ref.sub_mod.map_gen[0].weight.copy_(module.kq_logits.weight[1::2])
        for i in (0, 2):
            ref.mul_mod.feature_gen[i].weight.copy_(module.channel_gate[i].weight)
            ref.mul_mod.feature_gen[i].bias.copy_(module.channel_gate[i].bias)
    return ref


def _acm_arguments(module: ACM):
    gate = module.channel_gate
    return (module.kq_logits.weight, gate[0].weight, gate[0].bias, gate[2].weight, gate[2].bias, module.groups, module.variant)


def _stage_cases(module: ACM, ref: ReferenceACM, shape: Sequence[int], device: torch.device) -> Dict[str, Callable]:
    """The timed cases of one (stage, batch): {inference, training} x {floor, acm, ops} x
    {contiguous, channels_last}, and the literal reference (contiguous)."""
    arguments = _acm_arguments(module)
    params = list(module.parameters()) + list(ref.parameters())
    torch.manual_seed(1)
    x = torch.randn(shape, device=device)
    upstream = torch.randn(shape, device=device)
    scale = torch.rand(shape[0], shape[1], 1, 1, device=device, requires_grad=True)
    cases = {}

    def clear():
        for t in params + [scale]:
            t.grad = None

    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x_l = x.contiguous(memory_format=fmt)
        up_l = upstream.contiguous(memory_format=fmt)
        x_g = x_l.clone().requires_grad_(True)

        def infer(fn, x_l=x_l):
            def run():
                with torch.no_grad():
                    fn(x_l)

            return run

        def train(fn, x_g=x_g, up_l=up_l):
            def run():
                y, orth = fn(x_g)
                outputs, grads = [y], [up_l]
                if orth is not None:
                    outputs.append(orth)
                    grads.append(torch.ones_like(orth))
                torch.autograd.backward(outputs, grads)
                x_g.grad = None
                clear()

            return run

        def floor(x):
            return x * scale, None

        def acm(x):
            return attend_and_compare(x, *arguments)

        def ops(x):
            return attend_and_compare_ops(x, *arguments)

        for name, fn in (("floor", floor), ("acm", acm), ("ops", ops)):
            cases[f"{name}_infer_{layout}"] = infer(fn)
            cases[f"{name}_train_{layout}"] = train(fn)
        if layout == "contiguous":
            cases["ref_infer_contiguous"] = infer(ref)
            cases["ref_train_contiguous"] = train(ref)
    return cases


def _ratios(t: Dict[str, dict]) -> Dict[str, float]:
    """The figures of one (stage, batch), from the minima."""
    def r(a, b):
        return t[a]["min_ms"] / t[b]["min_ms"]

    out = {}
    for mode in ("infer", "train"):
        for layout in ("contiguous", "channels_last"):
            out[f"acm_over_floor_{mode}_{layout}"] = r(f"acm_{mode}_{layout}", f"floor_{mode}_{layout}")
            out[f"ops_over_acm_{mode}_{layout}"] = r(f"ops_{mode}_{layout}", f"acm_{mode}_{layout}")
        out[f"acm_cl_over_contiguous_{mode}"] = r(f"acm_{mode}_channels_last", f"acm_{mode}_contiguous")
        out[f"ref_over_acm_{mode}"] = r(f"ref_{mode}_contiguous", f"acm_{mode}_contiguous")
    return out


def bench_modules(stages: Dict[str, Sequence[int]], batches: Sequence[int], groups: int, repeats: int, device: torch.device) -> List[dict]:
    """One ACM per stage and batch size: see the module docstring. Returns one dict per
    (stage, batch) with its times ("times", ms) and ratios ("ratios")."""
    results = []
    for stage, (c, h, w) in stages.items():
        module = _random_acm(c, groups, device)
        ref = reference_like(module)
        for batch in batches:
            shape = (batch, c, h, w)
            times = run_interleaved(_stage_cases(module, ref, shape, device), repeats, device)
            x = torch.randn(shape, device=device, requires_grad=True)
            result = {"stage": stage, "shape": list(shape), "groups": groups, "times": times, "ratios": _ratios(times)}
            result["saved_over_x"] = {
                "acm": saved_bytes_over_input(lambda x: attend_and_compare(x, *_acm_arguments(module)), x),
                "ops": saved_bytes_over_input(lambda x: attend_and_compare_ops(x, *_acm_arguments(module)), x),
                "ref": saved_bytes_over_input(ref, x),
            }
            results.append(result)
            logger.info("measured %s batch %d", stage, batch)
            gc.collect()
    return results

