"""Side-by-side measurements of ACM, used by ``tools/benchmark.py`` (see docs/benchmark.md).

Every figure is a ratio of two cases timed interleaved in one run on one device (case 1, 2,
3, 1, 2, 3, ... after a warm-up round; minima over the repeats), so that the load of a
shared machine hits both sides alike. On CUDA the cases are timed with CUDA events after a
synchronisation, and each case's peak ``torch.cuda.max_memory_allocated`` is recorded.

Three parts:

* :func:`bench_modules`: one ACM at the ResNet-50 stage shapes of an 800x1216 image, batch 1
  and 2, contiguous and channels_last, inference (no grad) and training (forward+backward
  through Y and the orthogonality term), against the simplest plain-ops formulation
  (:func:`acm_d2.modeling.acm_function.attend_and_compare_ops` run eagerly), the literal
  :class:`acm_d2.ReferenceACM` (the authors' formulation) and the floor (one ``X * s`` pass).
* :func:`bench_models`: Mask R-CNN R-50-FPN built with ``detectron2.modeling.build_model``
  from the plain and the ACM config; the ACM model, and a third model with the authors'
  module in the ACM places, share every Detectron2 weight with the plain model; backbone
  inference and a training step; plus a control (an ``X * s`` module in the ACM places).
* :func:`bench_compiled`: the ``torch.compile``d plain and ACM backbones, inference.
"""
import copy
import gc
import logging
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from .modeling.acm import ACM
from .modeling.acm_function import attend_and_compare, attend_and_compare_ops
from .modeling.reference import ReferenceACM

__all__ = [
    "STAGES",
    "bench_compiled",
    "bench_models",
    "backbone_inference_case",
    "bench_modules",
    "build_benchmark_model",
    "build_sharing_models",
    "random_batch",
    "run_interleaved",
    "saved_bytes_over_input",
    "training_step_case",
]

logger = logging.getLogger(__name__)

#: (C, H, W) of X at the ACM places of ResNet-50 for an 800x1216 image.
STAGES = {"res2": (256, 200, 304), "res3": (512, 100, 152), "res4": (1024, 50, 76), "res5": (2048, 25, 38)}
#: Tiny shapes for a smoke test.
QUICK_STAGES = {"tiny3": (64, 12, 19), "tiny5": (128, 7, 9)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_interleaved(cases: Dict[str, Callable], repeats: int, device: torch.device, warmup: int = 1) -> Dict[str, dict]:
    """Time every case ``repeats`` times, cycling through the cases after ``warmup`` rounds.
    Returns {case: {"min_ms", "median_ms"[, "peak_mib"]}}."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    peaks: Dict[str, float] = {}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed = _time_once(fn, device)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            if round_index >= warmup:
                times[name].append(elapsed)
    out = {name: {"min_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts)} for name, ts in times.items()}
    for name, peak in peaks.items():
        out[name]["peak_mib"] = peak
    return out


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


def saved_bytes_over_input(fn: Callable, x: torch.Tensor) -> float:
    """Bytes saved for backward by the graph ``fn(x)`` builds (each storage once) over X's bytes."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x)
    return sum(storages.values()) / (x.numel() * x.element_size())


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


# ----------------------------------------------------------------------------------------
# Whole models.


class _AuthorsModule(ACM):
    """An ACM whose forward is the literal module with the same weights (``self.ref``), so
    that the meta-architecture treats it as an ACM (its orthogonality loss included)."""

    def __init__(self, acm: ACM):
        super().__init__(acm.channels, acm.groups, acm.variant)
        self.load_state_dict(acm.state_dict())
        self.ref = reference_like(acm)

    def forward_with_orthogonality(self, x):
        return self.ref(x)


class _ScaleControl(nn.Module):
    """The floor of any module in an ACM place: one ``X * s`` pass (a benchmark control)."""

    def __init__(self, channels: int, device: torch.device):
        super().__init__()
        self.register_buffer("scale", torch.rand(1, channels, 1, 1, device=device))

    def forward(self, x):
        return x * self.scale


def _replace_acms(model: nn.Module, make: Callable[[ACM], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with every ACM module ``m`` replaced by ``make(m)``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ACM):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(module))
    return model


def build_benchmark_model(config_file: str, device: torch.device, rois_per_image: int):
    from detectron2.modeling import build_model

    from .config import get_acm_cfg

    cfg = get_acm_cfg(config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)])
    # Every proposal is foreground and each image samples exactly ``rois_per_image``, with a
    # fixed ROIAlign sampling, so that the heads of all models do the same work.
    cfg.merge_from_list(
        [
            "MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.5], "MODEL.ROI_HEADS.IOU_LABELS", [1, 1],
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", rois_per_image, "MODEL.ROI_HEADS.POSITIVE_FRACTION", 1.0,
            "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 2,
        ]
    )
    torch.manual_seed(0)
    return build_model(cfg)


def build_sharing_models(config_dir: str, suffixes: Dict[str, str], device: torch.device,
                         rois_per_image: int = 32) -> Dict[str, nn.Module]:
    """Mask R-CNN R-50-FPN "plain" (mask_rcnn_R_50_FPN_1x.yaml) and, for each ``key: suffix``,
    the model of mask_rcnn_R_50_FPN_1x_<suffix>.yaml, sharing every Detectron2 weight with the
    plain one (only the context modules keep their own); the RPN head's output convs are
    zeroed, so that the proposals are the anchors in every model."""
    plain = build_benchmark_model(os.path.join(config_dir, "mask_rcnn_R_50_FPN_1x.yaml"), device, rois_per_image)
    head = plain.proposal_generator.rpn_head
    with torch.no_grad():
        for conv in (head.objectness_logits, head.anchor_deltas):
            conv.weight.zero_()
            conv.bias.zero_()
    models = {"plain": plain}
    for key, suffix in suffixes.items():
        model = build_benchmark_model(os.path.join(config_dir, f"mask_rcnn_R_50_FPN_1x_{suffix}.yaml"), device, rois_per_image)
        missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
        stray = [k for k in missing if ".context" not in k]
        if unexpected or stray or not missing:
            raise RuntimeError(f"the {key} model does not share the plain model's weights: {stray[:3]}, {unexpected[:3]}")
        models[key] = model
    return models


def build_model_trio(config_dir: str, device: torch.device, rois_per_image: int = 32) -> Dict[str, nn.Module]:
    """"plain", "acm" (the configs mask_rcnn_R_50_FPN_1x{,_acm}.yaml) and "authors" (the ACM
    model with the literal module in the ACM places), sharing every Detectron2 weight (see
    :func:`build_sharing_models`)."""
    models = build_sharing_models(config_dir, {"acm": "acm"}, device, rois_per_image)
    return {**models, "authors": _replace_acms(models["acm"], _AuthorsModule)}


def random_batch(batch: int, height: int, width: int, device: torch.device, boxes_per_image: int = 3, seed: int = 0):
    """Detectron2 training inputs: random images with a few random boxes and masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8).float()
        xy = torch.rand(boxes_per_image, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        wh = (0.2 + 0.2 * torch.rand(boxes_per_image, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(boxes_per_image, height, width, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 80, (boxes_per_image,), generator=generator)
        instances.gt_masks = BitMasks(masks)
        inputs.append({"image": image.to(device), "instances": instances.to(device), "height": height, "width": width})
    return inputs


def backbone_inference_case(model: nn.Module, images: torch.Tensor) -> Callable:
    """A timed case: ``model.backbone(images)`` without gradients."""

    def run():
        with torch.no_grad():
            model.backbone(images)

    return run


def training_step_case(model: nn.Module, inputs, optimizer) -> Callable:
    """A timed case: one training step of ``model`` on ``inputs`` (loss dict summed)."""

    def run():
        torch.manual_seed(0)  # the same sampling draws in every model
        losses = model(inputs)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return run


def bench_models(config_dir: str, device: torch.device, size: Sequence[int], batch: int, repeats: int) -> dict:
    """Backbone inference (plain, ACM, authors', control) and training step (plain, ACM,
    authors'), interleaved; ratios over the plain model."""
    from detectron2.utils.events import EventStorage

    models = build_model_trio(config_dir, device)
    inputs = random_batch(batch, size[0], size[1], device)
    with torch.no_grad():
        images = models["plain"].preprocess_image(inputs).tensor
    control = _replace_acms(models["acm"], lambda m: _ScaleControl(m.channels, device)).eval()

    for model in models.values():
        model.eval()
    inference = run_interleaved(
        {key: backbone_inference_case(model, images) for key, model in {**models, "control": control}.items()}, repeats, device
    )
    del control
    for model in models.values():
        model.train()
    with EventStorage(0):
        training = run_interleaved(
            {key: training_step_case(model, inputs, torch.optim.SGD(model.parameters(), lr=0.0)) for key, model in models.items()},
            repeats, device,
        )
    result = {"input": [batch, 3, *size], "backbone_input": list(images.shape), "inference": inference, "training": training}
    for kind, times in (("inference", inference), ("training", training)):
        for key in times:
            if key != "plain":
                result[f"{kind}_{key}_over_plain"] = times[key]["min_ms"] / times["plain"]["min_ms"]
    result["acm_modules"] = sum(isinstance(m, ACM) for m in models["acm"].modules())
    return result


def bench_compiled(config_dir: str, device: torch.device, size: Sequence[int], batch: int, repeats: int) -> dict:
    """Backbone inference of the plain and the ACM backbone, eager and ``torch.compile``d
    (default inductor), interleaved; ratios ACM / plain for each."""
    models = build_model_trio(config_dir, device)
    images = torch.randn(batch, 3, *size, device=device)
    backbones = {key: models[key].backbone.eval() for key in ("plain", "acm")}
    cases = {}
    for key, backbone in backbones.items():
        compiled = torch.compile(backbone)
        for name, fn in ((f"{key}_eager", backbone), (f"{key}_compiled", compiled)):
            cases[name] = (lambda fn: lambda: _no_grad_call(fn, images))(fn)
    start = time.perf_counter()
    for fn in cases.values():  # compile outside the timing
        fn()
    compile_s = time.perf_counter() - start
    times = run_interleaved(cases, repeats, device)
    return {
        "input": [batch, 3, *size],
        "times": times,
        "compile_and_first_call_s": compile_s,
        "eager_acm_over_plain": times["acm_eager"]["min_ms"] / times["plain_eager"]["min_ms"],
        "compiled_acm_over_plain": times["acm_compiled"]["min_ms"] / times["plain_compiled"]["min_ms"],
        "compiled_over_eager_acm": times["acm_compiled"]["min_ms"] / times["acm_eager"]["min_ms"],
    }


def _no_grad_call(fn, images):
    with torch.no_grad():
        fn(images)
