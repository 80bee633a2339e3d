"""Whole Mask R-CNN R-50-FPN models side by side, used by ``tools/benchmark.py`` and the GPU
check (see docs/benchmark.md; timing as in :mod:`acm_d2.benchmarks.timing`).

* :func:`bench_models`: Mask R-CNN R-50-FPN built with ``detectron2.modeling.build_model``
  from the plain and the ACM config; the ACM model, and a third model with the authors'
  module in the ACM places, share every Detectron2 weight with the plain model; backbone
  inference and a training step; plus a control (an ``X * s`` module in the ACM places).
* :func:`bench_compiled`: the ``torch.compile``d plain and ACM backbones, inference.
"""
import copy
import os
import time
from typing import Callable, Dict, Sequence

import torch
from torch import nn

from ..modeling.acm import ACM
from .module import reference_like
from .timing import autocast, run_interleaved

__all__ = [
    "backbone_inference_case",
    "bench_compiled",
    "bench_models",
    "build_benchmark_model",
    "build_model_trio",
    "build_sharing_models",
    "random_batch",
    "training_step_case",
]


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

    from ..config import get_acm_cfg

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


def backbone_inference_case(model: nn.Module, images: torch.Tensor, precision: str = "float32") -> Callable:
    """A timed case: ``model.backbone(images)`` without gradients, under ``precision``'s autocast."""
    device = images.device

    def run():
        with torch.no_grad(), autocast(device, precision):
            model.backbone(images)

    return run


def training_step_case(model: nn.Module, inputs, optimizer, precision: str = "float32") -> Callable:
    """A timed case: one training step of ``model`` on ``inputs`` (loss dict summed), the
    forward under ``precision``'s autocast (as Detectron2's AMPTrainer; no loss scaling)."""
    device = next(model.parameters()).device

    def run():
        torch.manual_seed(0)  # the same sampling draws in every model
        with autocast(device, precision):
            losses = model(inputs)
        optimizer.zero_grad(set_to_none=True)
        sum(loss.float() for loss in losses.values()).backward()
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

