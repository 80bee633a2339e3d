"""Models and comparisons shared by the export tests (test_export_route.py, test_onnx.py)."""
import numpy as np
import torch
from detectron2.modeling import build_backbone, build_model

from conftest import acm_cfg

R50_MASK_RCNN = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml"
R50_RETINANET = "configs/COCO-Detection/retinanet_R_50_FPN_1x_acm.yaml"


def coco_model(config_file=R50_MASK_RCNN, *opts, seed: int = 0):
    """The COCO model of ``config_file`` in eval mode, randomly initialised, with every
    residual branch's last norm scaled by 0.1 (as trained ResNets have small residuals): the
    features stay of order 1 through R-50 and the heads give spread-out scores, where a plain
    random R-50 saturates them (ties that make the detections' order arbitrary)."""
    torch.manual_seed(seed)
    model = build_model(acm_cfg(config_file, "MODEL.WEIGHTS", "", *opts)).eval()
    _small_residuals(model.backbone.bottom_up)
    return model


def coco_backbone(config_file=R50_MASK_RCNN, *opts, seed: int = 0):
    """The backbone alone of :func:`coco_model` (same initialisation), in eval mode."""
    torch.manual_seed(seed)
    cfg = acm_cfg(config_file, "MODEL.WEIGHTS", "", *opts)
    backbone = build_backbone(cfg).eval()
    _small_residuals(backbone.bottom_up)
    return backbone


def _small_residuals(resnet) -> None:
    with torch.no_grad():
        for block in resnet.modules():
            last = getattr(block, "conv3", None) or getattr(block, "conv2", None)
            if hasattr(block, "shortcut") and last is not None and hasattr(last, "norm"):
                last.norm.weight.mul_(0.1)


class FeaturesAsTuple(torch.nn.Module):
    """A backbone whose dict of features (name -> (N, C, H/s, W/s)) comes out as a tuple in
    the order of :attr:`names` (for tracing and ONNX, which take no dicts)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.names = list(backbone.output_shape())

    def forward(self, x):
        features = self.backbone(x)
        return tuple(features[name] for name in self.names)


def image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    """A (3, height, width) float image with values in [0, 255)."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def match_detections(boxes, classes, scores, other_boxes, other_classes, other_scores, rtol: float):
    """The permutation p with other[p[i]] the detection i: same class, score within ``rtol``
    of the top score, nearest box. Detections whose scores are that close may come in either
    order from two implementations; any other difference fails here."""
    boxes, other_boxes = np.asarray(boxes), np.asarray(other_boxes)
    assert len(boxes) == len(other_boxes) and len(boxes) > 0
    tolerance = rtol * float(np.abs(scores).max())
    order = []
    for i in range(len(boxes)):
        same = (np.asarray(other_classes) == classes[i]) & (np.abs(np.asarray(other_scores) - scores[i]) <= tolerance)
        assert same.any(), f"detection {i} (class {classes[i]}, score {scores[i]}) has no counterpart"
        distance = np.where(same, np.abs(other_boxes - boxes[i]).max(axis=1), np.inf)
        order.append(int(distance.argmin()))
    assert sorted(order) == list(range(len(boxes))), "two detections matched the same one"
    return np.array(order)


def assert_close_to_magnitude(got, expected, rtol: float, name: str = "") -> None:
    """|got - expected| <= rtol * max |expected|, elementwise."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    scale = float(np.abs(expected).max())
    error = float(np.abs(got - expected).max())
    assert error <= rtol * scale, f"{name}: max |difference| {error:.3g} > {rtol} x max |value| {scale:.3g}"
