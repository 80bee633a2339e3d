"""ACM and its peers (SE, GC, CBAM, NL, CC) measured side by side, for ``tools/benchmark.py``
(see docs/benchmark.md). Timing as in :mod:`acm_d2.benchmarks.timing`: cases interleaved in one run,
minima over the repeats, ratios of cases of the same run.

* :func:`bench_peer_modules`: each module at the ResNet-50 shapes of an 800x1216 batch of 2
  where its paper puts it (ACM, SE, GC, CBAM: res2-res5; NL, CC: res4), contiguous and
  channels_last, inference (no grad) and training (forward + backward), over the floor (one
  ``X * s`` pass), and the bytes the module saves for backward over the bytes of X.
* :func:`attention_memory_scaling`: what NL and CC save for backward at res4 as the image
  grows: NL's map has (HW)^2 entries, CC's HW (H + W).
* :func:`bench_peer_models`: Mask R-CNN R-50-FPN from the configs
  ``mask_rcnn_R_50_FPN_1x{,_se,_gc,_cbam,_nl,_cc,_acm}.yaml``, every Detectron2 weight shared
  with the plain model: backbone inference and a training step, over the plain model.
* :func:`precision_errors`: each module under autocast against its float32 self, at a
  realistic magnitude of X: are output and input gradient finite, and how far off.

``precision`` is "float32" (no autocast) or "bfloat16" / "float16": the module's forward
(the model's forward, as Detectron2's ``SOLVER.AMP``) runs under ``torch.autocast`` with
that dtype, X itself in that dtype as the convolutions before it would leave it.
"""
import gc
import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..modeling.context import CONTEXT_MODULE_REGISTRY
from .model import backbone_inference_case, build_sharing_models, random_batch, training_step_case
from .timing import PRECISIONS, autocast, run_interleaved, saved_bytes_over_input

__all__ = ["PEER_PLACES", "attention_memory_scaling", "bench_peer_models", "bench_peer_modules", "build_peer_models",
           "precision_errors"]

logger = logging.getLogger(__name__)

#: Module name -> the R-50 stages where the Mask R-CNN setting of its paper puts it.
PEER_PLACES = {
    "ACM": ("res2", "res3", "res4", "res5"),
    "SE": ("res2", "res3", "res4", "res5"),
    "GC": ("res2", "res3", "res4", "res5"),
    "CBAM": ("res2", "res3", "res4", "res5"),
    "NL": ("res4",),
    "CC": ("res4",),
}
#: The config suffix of each module (configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_<suffix>.yaml).
_CONFIG_SUFFIX = {"SE": "se", "GC": "gc", "CBAM": "cbam", "NL": "nl", "CC": "cc", "ACM": "acm"}


def _random_module(name: str, channels: int, device: torch.device) -> nn.Module:
    """The module ``name`` for ``channels`` channels with random parameters (not its zero init,
    whose branches autograd would still compute, but a trained module's numbers)."""
    torch.manual_seed(0)
    module = CONTEXT_MODULE_REGISTRY.get(name)(channels).to(device)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    return module.train()


def _module_cases(modules: Dict[str, nn.Module], shape: Sequence[int], device: torch.device,
                  precision: str = "float32") -> Dict[str, object]:
    """{floor, modules} x {infer, train} x {contiguous, channels_last} for one shape; X (and
    the floor's ``X * s``) in ``precision``, the modules' forward under its autocast."""
    dtype = PRECISIONS[precision]
    torch.manual_seed(1)
    x = torch.randn(shape, device=device).to(dtype)
    upstream = torch.randn(shape, device=device).to(dtype)
    scale = torch.rand(1, shape[1], 1, 1, device=device).to(dtype).requires_grad_(True)
    everything = {"floor": lambda t: t * scale, **modules}
    cases = {}
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x_l, up_l = x.contiguous(memory_format=fmt), upstream.contiguous(memory_format=fmt)
        x_g = x_l.clone().requires_grad_(True)
        for name, fn in everything.items():
            def infer(fn=fn, x_l=x_l):
                with torch.no_grad(), autocast(device, precision):
                    fn(x_l)

            def train(fn=fn, x_g=x_g, up_l=up_l):
                with autocast(device, precision):
                    y = fn(x_g)
                y.backward(up_l.to(y.dtype))
                x_g.grad = None
                scale.grad = None
                for module in modules.values():
                    module.zero_grad(set_to_none=True)

            cases[f"{name}_infer_{layout}"] = infer
            cases[f"{name}_train_{layout}"] = train
    return cases


def _modules_at(stage: str, channels: int, device: torch.device) -> Dict[str, nn.Module]:
    """Every module placed at ``stage`` (:data:`PEER_PLACES`; every module at a stage of another name)."""
    return {name: _random_module(name, channels, device) for name, places in PEER_PLACES.items()
            if stage in places or not stage.startswith("res")}


def bench_peer_modules(stages: Dict[str, Sequence[int]], batch: int, repeats: int, device: torch.device,
                       precision: str = "float32", warmup: int = 1) -> List[dict]:
    """One result per stage ({name: (C, H, W)}, e.g. :data:`acm_d2.benchmarks.timing.STAGES`): the
    times of every module placed there (:func:`_modules_at`), their ratios over the floor (in
    the same ``precision``), their saved bytes over X's, and (on CUDA) each case's peak memory."""
    results = []
    for stage, (c, h, w) in stages.items():
        shape = (batch, c, h, w)
        modules = _modules_at(stage, c, device)
        times = run_interleaved(_module_cases(modules, shape, device, precision), repeats, device, warmup)
        x = torch.randn(shape, device=device).to(PRECISIONS[precision]).requires_grad_(True)
        over_floor = {
            f"{name}_{mode}_{layout}": times[f"{name}_{mode}_{layout}"]["min_ms"] / times[f"floor_{mode}_{layout}"]["min_ms"]
            for name in modules for mode in ("infer", "train") for layout in ("contiguous", "channels_last")
        }
        with autocast(device, precision):
            saved = {name: saved_bytes_over_input(module, x) for name, module in modules.items()}
        results.append({"stage": stage, "shape": list(shape), "precision": precision, "times": times,
                        "over_floor": over_floor, "saved_over_x": saved})
        logger.info("measured the peers at %s in %s", stage, precision)
        del modules
        gc.collect()
    return results


def attention_memory_scaling(device: torch.device, sides: Sequence[int] = (400, 600, 800)) -> List[dict]:
    """NL and CC at res4 (C = 1024, stride 16) of a batch of 1 whose short side is each of
    ``sides`` (long side x 1.52, as 800x1216): the bytes each saves for backward, over X's."""
    rows = []
    modules = {name: _random_module(name, 1024, device) for name in ("NL", "CC")}
    for side in sides:
        h, w = side // 16, int(side * 1.52) // 16
        x = torch.randn(1, 1024, h, w, device=device, requires_grad=True)
        row = {"input": [side, int(side * 1.52)], "res4": [h, w], "hw": h * w}
        for name, module in modules.items():
            row[f"{name}_saved_over_x"] = saved_bytes_over_input(module, x)
            row[f"{name}_saved_mib"] = row[f"{name}_saved_over_x"] * x.numel() * x.element_size() / 2**20
        rows.append(row)
    return rows


def precision_errors(stages: Dict[str, Sequence[int]], batch: int, device: torch.device, precision: str,
                     magnitude: float = 8.0) -> List[dict]:
    """Each module of each stage (:func:`_modules_at`) under ``precision``'s autocast, X in that
    dtype, against the module in float32 on the same X and upstream gradient U (both drawn in
    float32, X ~ N(0, magnitude^2), U ~ N(0, 1), and rounded to ``precision``, so that only the
    module's own arithmetic differs): whether Y and dL/dX (L = sum(Y * U)) are finite, and
    their largest error over the float32 values' largest magnitude."""
    dtype = PRECISIONS[precision]
    rows = []
    for stage, (c, h, w) in stages.items():
        torch.manual_seed(2)
        x = (torch.randn(batch, c, h, w, device=device) * magnitude).to(dtype).float()
        upstream = torch.randn_like(x).to(dtype).float()
        for name, module in _modules_at(stage, c, device).items():
            results = {}
            for p in ("float32", precision):
                x_p = x.to(PRECISIONS[p], copy=True).requires_grad_(True)
                with autocast(device, p):
                    y = module(x_p)
                y.backward(upstream.to(y.dtype))
                results[p] = (y.detach().float(), x_p.grad.float())
            (y32, g32), (y_p, g_p) = results["float32"], results[precision]
            rows.append({
                "stage": stage, "module": name, "precision": precision, "magnitude": magnitude,
                "finite": bool(torch.isfinite(y_p).all() and torch.isfinite(g_p).all()),
                "output_error": float((y_p - y32).abs().max() / y32.abs().max().clamp_min(1e-30)),
                "grad_error": float((g_p - g32).abs().max() / g32.abs().max().clamp_min(1e-30)),
            })
        gc.collect()
    return rows


def build_peer_models(config_dir: str, device: torch.device, rois_per_image: int = 32) -> Dict[str, nn.Module]:
    """The plain Mask R-CNN R-50-FPN and each module's, sharing the plain one's weights
    (:func:`acm_d2.benchmarks.model.build_sharing_models`)."""
    return build_sharing_models(config_dir, _CONFIG_SUFFIX, device, rois_per_image)


def bench_peer_models(config_dir: str, device: torch.device, size: Sequence[int], batch: int, repeats: int,
                      rois_per_image: int = 32, precision: str = "float32", models: Optional[Dict[str, nn.Module]] = None,
                      warmup: int = 1) -> dict:
    """Backbone inference and a training step of the plain Mask R-CNN R-50-FPN and of each
    peer's model (sharing the plain model's weights), interleaved; ratios over the plain one.
    The forward runs under ``precision``'s autocast (as ``SOLVER.AMP``), the backward outside.
    ``models``: those of :func:`build_peer_models`, to measure them again (else built here);
    ``warmup``: untimed rounds before the ``repeats`` timed ones."""
    from detectron2.utils.events import EventStorage

    models = models if models is not None else build_peer_models(config_dir, device, rois_per_image)
    plain = models["plain"]
    inputs = random_batch(batch, size[0], size[1], device)
    with torch.no_grad():
        images = plain.preprocess_image(inputs).tensor

    for model in models.values():
        model.eval()
    inference = run_interleaved(
        {key: backbone_inference_case(model, images, precision) for key, model in models.items()}, repeats, device, warmup)
    for model in models.values():
        model.train()
    with EventStorage(0):
        training = run_interleaved(
            {key: training_step_case(model, inputs, torch.optim.SGD(model.parameters(), lr=0.0), precision)
             for key, model in models.items()},
            repeats, device, warmup,
        )
    result = {"input": [batch, 3, *size], "precision": precision, "inference": inference, "training": training,
              "over_plain": {}}
    for key, model in models.items():
        if key != "plain":
            result["over_plain"][key] = {
                "inference": inference[key]["min_ms"] / inference["plain"]["min_ms"],
                "training": training[key]["min_ms"] / training["plain"]["min_ms"],
                "parameters": sum(p.numel() for p in model.backbone.parameters()) - sum(p.numel() for p in plain.backbone.parameters()),
            }
    return result
