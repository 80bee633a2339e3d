"""The ACM attention maps of a model on images, as in Fig. 4 of the paper (arXiv 2007.07506).

What is computed, for every ACM module of a model and every image:

* the K and Q attention maps of each of its G groups, ``(G, 2, h, w)`` softmax maps at the
  module's feature resolution (index 0 = K, 1 = Q; each sums to 1 over positions);
* the cosine of K and Q (the pooled vectors with the spatial mean subtracted, as in the
  orthogonality term): the paper's "similarity" of K and Q (mean |cosine| 0.1113 with
  lambda 0 and 0.0394 with lambda 0.1 on its data);
* with a mask (or box) of the image: the attention mass each map puts inside it. A module's
  overlap score is the largest of its 2G values; the paper showed the module whose maps
  overlap the lesion most.

The inputs of the ACM modules (the outputs of their block's last conv + norm) are taken from
an :class:`acm_d2.ACMRecorder` while the model's backbone runs on the preprocessed image.
:func:`attention_grid` draws a module's maps over the image, :func:`summarize_attention`
gives the numbers of several images, and :func:`annotation_mask` the region of a dataset
record's instances.
"""
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling.acm import ACM
from .modeling.recorder import ACMRecorder
from .modeling.resnet import acm_modules, context_modules

__all__ = [
    "ImageAttention",
    "annotation_mask",
    "attention_grid",
    "attention_on_image",
    "dataset_images",
    "kq_cosine",
    "mask_overlap",
    "PositionAttention",
    "maps_to_image",
    "position_attention_on_image",
    "position_attention_picture",
    "rank_modules",
    "summarize_attention",
]

logger = logging.getLogger(__name__)


@torch.no_grad()
def kq_cosine(module: ACM, x: torch.Tensor) -> torch.Tensor:
    """Cosine of K and Q of ``module`` on input x (N, C, H, W): shape (N,).

    K and Q are the attention-pooled vectors with the spatial mean mu subtracted (the
    vectors of the orthogonality term (K . Q) / C). Needs a variant with K and Q."""
    if module.variant not in ("P(X+(K-Q))", "X+(K-Q)"):
        raise ValueError(f"ACM variant {module.variant!r} has no K and Q to compare")
    n, c, h, w = x.shape
    groups = module.groups
    maps = module.attention_maps(x).float().reshape(n, groups, 2, h * w)  # (N, G, 2, HW)
    grouped = x.float().reshape(n, groups, c // groups, h * w)  # (N, G, C/G, HW)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)  # (N, G, C/G, HW)
    pooled = torch.matmul(centered, maps.transpose(-1, -2)).reshape(n, c, 2)  # (N, C, 2)
    return F.cosine_similarity(pooled[..., 0], pooled[..., 1], dim=1, eps=1e-12)  # (N,)


def mask_overlap(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention mass inside a mask: maps (G, 2, h, w), mask (H, W) in [0, 1] on the padded
    model input, with H, W multiples of h, w (the module's stride). Returns (G, 2)."""
    h, w = maps.shape[-2:]
    fraction = F.adaptive_avg_pool2d(mask.float()[None, None], (h, w))[0, 0]  # (h, w)
    return (maps.float() * fraction).sum(dim=(-2, -1))  # (G, 2)


@dataclass
class ImageAttention:
    """The attention of every ACM module of a model on one image.

    Attributes:
        image_size: (H, W) of the original image.
        input_size: (h, w) of the resized image given to the model.
        padded_size: (h, w) after the model's padding (size_divisibility).
        maps: block name -> (G, 2, h_f, w_f) K/Q softmax maps, float32, on CPU.
        cosine: block name -> cosine of K and Q (mean-subtracted) for this image.
        overlap: block name -> (G, 2) attention mass inside the mask, if a mask was given.
    """

    image_size: Tuple[int, int]
    input_size: Tuple[int, int]
    padded_size: Tuple[int, int]
    maps: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    cosine: Dict[str, float] = field(default_factory=dict)
    overlap: Dict[str, torch.Tensor] = field(default_factory=dict)


def _to_model_input(image: np.ndarray, augmentation, input_format: str) -> torch.Tensor:
    """BGR uint8 (H, W, 3) -> the (3, h, w) float tensor Detectron2's models take."""
    if input_format == "RGB":
        image = image[:, :, ::-1]
    if augmentation is not None:
        from detectron2.data import transforms as T

        aug_input = T.AugInput(np.ascontiguousarray(image))
        augmentation(aug_input)
        image = aug_input.image
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))


def _context_inputs(model: nn.Module, image: np.ndarray, augmentation, input_format: str):
    """Run the backbone of ``model`` in eval mode on one BGR uint8 image: ({context module:
    its input X}, (h, w) of the resized image, (h, w) after the model's padding)."""
    from detectron2.data import transforms as T

    if isinstance(augmentation, (list, tuple)):
        augmentation = T.AugmentationList(list(augmentation))
    tensor = _to_model_input(image, augmentation, input_format)
    was_training = model.training
    model.eval()
    try:
        with ACMRecorder() as recorder:
            images = model.preprocess_image([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])
            model.backbone(images.tensor)
    finally:
        model.train(was_training)
    inputs = {call.module: call.input for call in recorder.calls}
    return inputs, tuple(int(s) for s in tensor.shape[-2:]), tuple(int(s) for s in images.tensor.shape[-2:])


@torch.no_grad()
def attention_on_image(
    model: nn.Module,
    image: np.ndarray,
    augmentation=None,
    input_format: str = "BGR",
    mask: Optional[np.ndarray] = None,
) -> ImageAttention:
    """Run the backbone of ``model`` (a Detectron2 meta-architecture with ``preprocess_image``
    and ``backbone``, e.g. GeneralizedRCNN, RetinaNet) on one BGR uint8 image (H, W, 3) and
    return the ACM attention of every module.

    Args:
        augmentation: the test-time resize, a Detectron2 Augmentation (e.g.
            ``ResizeShortestEdge(800, 1333)``) or None for the image as it is.
        input_format: the model's INPUT.FORMAT ("BGR" or "RGB").
        mask: optional (H, W) array, nonzero inside the region to rank modules by.
    """
    height, width = image.shape[:2]
    inputs, input_size, padded_size = _context_inputs(model, image, augmentation, input_format)
    result = ImageAttention((height, width), input_size, padded_size)
    padded_mask = None
    if mask is not None:
        resized = cv2.resize((mask > 0).astype(np.float32), (input_size[1], input_size[0]), interpolation=cv2.INTER_AREA)
        padded_mask = torch.zeros(padded_size)
        padded_mask[: input_size[0], : input_size[1]] = torch.from_numpy(resized)
    for name, module in acm_modules(model).items():
        if module not in inputs or module.kq_logits is None:
            continue
        x = inputs[module]
        maps = module.attention_maps(x)[0].float().cpu()  # (G, 2, h_f, w_f) (G, 1, ... for "P(X+K)")
        result.maps[name] = maps
        if module.variant in ("P(X+(K-Q))", "X+(K-Q)"):
            result.cosine[name] = float(kq_cosine(module, x)[0])
        if padded_mask is not None:
            result.overlap[name] = mask_overlap(maps, padded_mask)
    return result


def rank_modules(results: Sequence[ImageAttention]) -> List[Dict]:
    """Modules by overlap with the masks, best first: for each module, the mean over images
    of its best map's mass inside the mask, and which group / map (K or Q) that was on the
    first image. Needs results computed with a mask."""
    names = [n for n in results[0].overlap] if results else []
    ranking = []
    for name in names:
        best = [float(r.overlap[name].max()) for r in results if name in r.overlap]
        first = results[0].overlap[name]
        index, per_group = int(first.argmax()), first.shape[1]
        ranking.append(
            {
                "block": name,
                "overlap": sum(best) / len(best),
                "best_group": index // per_group,
                "best_map": "KQ"[index % per_group],
            }
        )
    return sorted(ranking, key=lambda r: -r["overlap"])


def maps_to_image(maps: torch.Tensor, padded_size, input_size, image_size) -> torch.Tensor:
    """(..., h_f, w_f) maps at feature resolution -> (..., H, W) over the original image:
    bilinear upsampling to the padded input, crop of the padding, resize to the image."""
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:]).float()
    up = F.interpolate(flat, size=tuple(padded_size), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    up = F.interpolate(up, size=tuple(image_size), mode="bilinear", align_corners=False)
    return up.reshape(*lead, *image_size)


def _tile_size(image_size, max_tile: int) -> Tuple[int, int]:
    height, width = image_size
    scale = min(1.0, max_tile / max(height, width)) if max_tile else 1.0
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def attention_grid(
    image: np.ndarray,
    attention: ImageAttention,
    block: str,
    groups_per_row: int = 4,
    max_tile: int = 256,
    alpha: float = 0.5,
) -> np.ndarray:
    """The K and Q maps of every group of module ``block`` over the image, as one BGR uint8
    picture: rows of ``groups_per_row`` groups, each group a K tile and a Q tile side by side.

    Each tile is the image scaled so that its longer side is at most ``max_tile`` (never
    enlarged), so the picture is ``ceil(G / groups_per_row) * th`` by
    ``2 * min(G, groups_per_row) * tw`` pixels for tiles of (th, tw). Each map is scaled to
    its own maximum and drawn with the JET colour map, blended with the image.
    """
    maps = attention.maps[block]  # (G, 2, h_f, w_f)
    groups = maps.shape[0]
    tile_h, tile_w = _tile_size(attention.image_size, max_tile)
    upsampled = maps_to_image(maps, attention.padded_size, attention.input_size, (tile_h, tile_w)).numpy()
    base = cv2.resize(image, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
    per_group = maps.shape[1]  # K and Q, or K alone for "P(X+K)"
    columns = per_group * min(groups, groups_per_row)
    rows = math.ceil(groups / groups_per_row)
    canvas = np.zeros((rows * tile_h, columns * tile_w, 3), dtype=np.uint8)
    font_scale = max(0.3, tile_w / 256.0)
    for g in range(groups):
        for kind in range(per_group):
            heat = upsampled[g, kind]
            heat = heat / max(float(heat.max()), 1e-12)
            colour = cv2.applyColorMap(np.clip(heat * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
            tile = cv2.addWeighted(base, 1.0 - alpha, colour, alpha, 0.0)
            if tile_w >= 48:
                cv2.putText(
                    tile, f"g{g} {'KQ'[kind]}", (2, int(12 * font_scale) + 2), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * font_scale, (255, 255, 255), 1, cv2.LINE_AA,
                )
            row, col = divmod(g, groups_per_row)
            y, x = row * tile_h, (per_group * col + kind) * tile_w
            canvas[y : y + tile_h, x : x + tile_w] = tile
    return canvas


def annotation_mask(record: Dict, size: Tuple[int, int]) -> np.ndarray:
    """The union of the instances of a Detectron2 dataset record as a bool (H, W) mask:
    their masks (polygons or RLE) where they have one, else their boxes."""
    from detectron2.structures import BoxMode, polygons_to_bitmask
    from pycocotools import mask as mask_util

    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    for ann in record.get("annotations", []):
        segm = ann.get("segmentation")
        if isinstance(segm, list) and segm:
            mask |= polygons_to_bitmask(segm, height, width)
        elif isinstance(segm, dict):
            rle = mask_util.frPyObjects(segm, height, width) if isinstance(segm.get("counts"), list) else segm
            mask |= mask_util.decode(rle).astype(bool)
        else:
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
    return mask


def dataset_images(datasets: Sequence[str], count: int, with_masks: bool = False) -> List[Tuple[str, np.ndarray, Optional[np.ndarray]]]:
    """[(file stem, BGR image, union mask of its instances or None)] of the first ``count``
    images of the first of ``datasets`` (a built-in synthetic one is written first if needed)."""
    from detectron2.data import DatasetCatalog

    from .data import ensure_synthetic_dataset

    if not datasets:
        raise ValueError("no images given and the config names no test dataset (DATASETS.TEST)")
    ensure_synthetic_dataset([datasets[0]])
    items = []
    for record in DatasetCatalog.get(datasets[0])[:count]:
        image = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {record['file_name']} of dataset {datasets[0]}")
        mask = annotation_mask(record, image.shape[:2]) if with_masks else None
        items.append((os.path.splitext(os.path.basename(record["file_name"]))[0], image, mask))
    return items


def summarize_attention(results: Sequence[ImageAttention], block: str, groups: int) -> Tuple[Dict, List[str]]:
    """The numbers of several images: (a JSON-able summary, the lines of a printed table).

    The summary has, per ACM module, the mean |cosine(K, Q)| over the images (the paper's
    "similarity": 0.1113 with lambda 0, 0.0394 with lambda 0.1 on its data), their mean over
    the modules, and, for results computed with masks, the modules ranked by overlap."""
    names = list(results[0].maps) if results else []
    similarity = {
        name: float(np.mean([abs(r.cosine[name]) for r in results if name in r.cosine]))
        for name in names
        if any(name in r.cosine for r in results)
    }
    summary = {
        "block": block,
        "groups": groups,
        "mean_abs_cosine_kq": similarity,
        "mean_abs_cosine_kq_all_modules": float(np.mean(list(similarity.values()))) if similarity else math.nan,
    }
    if results and results[0].overlap:
        summary["ranking_by_overlap"] = rank_modules(results)
    ranked = "ranking_by_overlap" in summary
    lines = [f"{'module':<10} {'mean |cos(K,Q)|':>16}" + (f" {'overlap':>8}  best map" if ranked else "")]
    for row in summary.get("ranking_by_overlap") or [{"block": n} for n in similarity]:
        line = f"{row['block']:<10} {similarity.get(row['block'], math.nan):>16.4f}"
        if ranked:
            line += f" {row['overlap']:>8.4f}  g{row['best_group']} {row['best_map']}"
        lines.append(line)
    lines.append(
        f"mean over modules: {summary['mean_abs_cosine_kq_all_modules']:.4f} (paper: 0.1113 with lambda 0, 0.0394 with 0.1)"
    )
    return summary, lines


@dataclass
class PositionAttention:
    """Where the context modules with position maps (NL, CC, GC, CBAM) look, for one position.

    Attributes:
        image_size, input_size, padded_size: as :class:`ImageAttention`.
        position: (x, y) in image pixels, the position asked about.
        maps: module path ("res4.4.context_after") -> (h_f, w_f) float32 map on CPU: NL the
            softmax row of the feature position under ``position``; CC its first pass's row
            and column weights; GC its pooling weights; CBAM its spatial gate (the last two
            are the same for every position).
        feature_positions: module path -> (row, col) of ``position`` on its feature map.
    """

    image_size: Tuple[int, int]
    input_size: Tuple[int, int]
    padded_size: Tuple[int, int]
    position: Tuple[float, float]
    maps: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    feature_positions: Dict[str, Tuple[int, int]] = field(default_factory=dict)


@torch.no_grad()
def position_attention_on_image(
    model: nn.Module, image: np.ndarray, position: Tuple[float, float], augmentation=None, input_format: str = "BGR"
) -> PositionAttention:
    """Run the backbone of ``model`` on one BGR uint8 image (H, W, 3) and return, for every
    context module that has ``attention_of_position``, its map for the image position
    ``position`` = (x, y) in pixels (see :class:`PositionAttention`)."""
    height, width = image.shape[:2]
    if not (0 <= position[0] < width and 0 <= position[1] < height):
        raise ValueError(f"position (x, y) = {tuple(position)} is outside the image of {width} x {height} pixels")
    inputs, input_size, padded_size = _context_inputs(model, image, augmentation, input_format)
    result = PositionAttention((height, width), input_size, padded_size, tuple(position))
    for name, module in context_modules(model).items():
        if module not in inputs or not hasattr(module, "attention_of_position"):
            continue
        x = inputs[module]
        h_f, w_f = x.shape[-2:]
        # image pixel -> model input pixel -> feature cell (the padding is at the bottom / right)
        row = min(h_f - 1, int(position[1] * input_size[0] / height * h_f / result.padded_size[0]))
        col = min(w_f - 1, int(position[0] * input_size[1] / width * w_f / result.padded_size[1]))
        result.maps[name] = module.attention_of_position(x, row, col)[0].float().cpu()
        result.feature_positions[name] = (row, col)
    return result


def position_attention_picture(image: np.ndarray, attention: PositionAttention, block: str, alpha: float = 0.5) -> np.ndarray:
    """The map of module ``block`` over the image (BGR uint8, the image's size), scaled to its
    maximum, JET colours, with the asked position marked by a white cross."""
    heat = maps_to_image(attention.maps[block], attention.padded_size, attention.input_size, attention.image_size).numpy()
    heat = heat / max(float(heat.max()), 1e-12)
    colour = cv2.applyColorMap(np.clip(heat * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(image, 1.0 - alpha, colour, alpha, 0.0)
    x, y = (int(round(v)) for v in attention.position)
    size = max(3, min(image.shape[:2]) // 20)
    cv2.drawMarker(picture, (x, y), (255, 255, 255), cv2.MARKER_CROSS, size, 1)
    return picture
