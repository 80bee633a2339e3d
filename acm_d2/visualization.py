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

The inputs of the ACM modules (the outputs of their block's conv3 + norm) are captured with
forward hooks while the model's backbone runs on the preprocessed image, so nothing in the
model changes. :func:`attention_grid` draws a module's maps over the image.
"""
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling.acm import ACM

__all__ = [
    "ACMInputRecorder",
    "ImageAttention",
    "acm_modules",
    "attention_grid",
    "attention_on_image",
    "kq_cosine",
    "mask_overlap",
    "maps_to_image",
    "rank_modules",
]

logger = logging.getLogger(__name__)


def acm_modules(model: nn.Module) -> "OrderedDict[str, ACM]":
    """The ACM modules of ``model`` in forward order, by block name ("res3.0", "res5.2").

    The name is the module's qualified name without the ``.acm`` it is registered as and
    without the path to the ResNet (``backbone.bottom_up.``)."""
    found: "OrderedDict[str, ACM]" = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, ACM):
            short = name[: -len(".acm")] if name.endswith(".acm") else name
            short = short.rsplit("bottom_up.", 1)[-1]
            found[short] = module
    return found


class ACMInputRecorder:
    """Context manager: records the input of every ACM module of a model (forward hooks).

    ``inputs[name]`` is the list of tensors (N, C, H, W) the module ``name`` received,
    detached, one per forward call inside the ``with`` block.
    """

    def __init__(self, model: nn.Module):
        self.modules = acm_modules(model)
        self.inputs: Dict[str, List[torch.Tensor]] = {name: [] for name in self.modules}
        self._handles = []

    def __enter__(self) -> "ACMInputRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def _recorder(self, name: str):
        def hook(module, inputs, output):
            self.inputs[name].append(inputs[0].detach())

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def kq_cosine(module: ACM, x: torch.Tensor) -> torch.Tensor:
    """Cosine of K and Q of ``module`` on input x (N, C, H, W): shape (N,).

    K and Q are the attention-pooled vectors with the spatial mean mu subtracted (the
    vectors of the orthogonality term (K . Q) / C)."""
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
    from detectron2.data import transforms as T

    if isinstance(augmentation, (list, tuple)):
        augmentation = T.AugmentationList(list(augmentation))
    height, width = image.shape[:2]
    tensor = _to_model_input(image, augmentation, input_format)
    was_training = model.training
    model.eval()
    try:
        with ACMInputRecorder(model) as recorder:
            images = model.preprocess_image([{"image": tensor, "height": height, "width": width}])
            model.backbone(images.tensor)
    finally:
        model.train(was_training)
    input_size = tuple(int(s) for s in tensor.shape[-2:])
    padded_size = tuple(int(s) for s in images.tensor.shape[-2:])
    result = ImageAttention((height, width), input_size, padded_size)
    padded_mask = None
    if mask is not None:
        resized = cv2.resize((mask > 0).astype(np.float32), (input_size[1], input_size[0]), interpolation=cv2.INTER_AREA)
        padded_mask = torch.zeros(padded_size)
        padded_mask[: input_size[0], : input_size[1]] = torch.from_numpy(resized)
    for name, module in recorder.modules.items():
        if not recorder.inputs[name]:
            continue
        x = recorder.inputs[name][-1]
        maps = module.attention_maps(x)[0].float().cpu()  # (G, 2, h_f, w_f)
        result.maps[name] = maps
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
        index = int(first.argmax())
        ranking.append(
            {
                "block": name,
                "overlap": sum(best) / len(best),
                "best_group": index // 2,
                "best_map": "KQ"[index % 2],
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
    columns = 2 * min(groups, groups_per_row)
    rows = math.ceil(groups / groups_per_row)
    canvas = np.zeros((rows * tile_h, columns * tile_w, 3), dtype=np.uint8)
    font_scale = max(0.3, tile_w / 256.0)
    for g in range(groups):
        for kind in range(2):
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
            y, x = row * tile_h, (2 * col + kind) * tile_w
            canvas[y : y + tile_h, x : x + tile_w] = tile
    return canvas
