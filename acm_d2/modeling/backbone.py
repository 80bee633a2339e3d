"""Backbone builders with ACM, registered in Detectron2's BACKBONE_REGISTRY.

Each builder is Detectron2's builder of the same name without ``_acm``, with the ResNet
re-hosted as :class:`ACMResNet` (same blocks, same parameter names).
"""
import logging

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .orth_loss import check_orth_loss_weight
from .resnet import ACMResNet

__all__ = [
    "build_resnet_acm_backbone",
    "build_resnet_fpn_acm_backbone",
    "build_retinanet_resnet_fpn_acm_backbone",
    "check_acm_config",
]

logger = logging.getLogger(__name__)

_RESNET_DEPTHS = (18, 34, 50, 101, 152)


def check_acm_config(cfg) -> None:
    """Raise ValueError for settings of MODEL.ACM / MODEL.RESNETS that ACM cannot honour."""
    acm = cfg.MODEL.ACM
    weight = check_orth_loss_weight(acm.ORTH_LOSS_WEIGHT)
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RESNET_DEPTHS:
        raise ValueError(
            f"The ACM backbones are ResNets: MODEL.RESNETS.DEPTH must be one of {list(_RESNET_DEPTHS)}, "
            f"got {depth!r}"
        )
    if (
        weight > 0
        and acm.MODULE == "ACM"
        and cfg.MODEL.META_ARCHITECTURE != "WithACMOrthLoss"
    ):
        logger.warning(
            "MODEL.ACM.ORTH_LOSS_WEIGHT=%s but MODEL.META_ARCHITECTURE=%s: the orthogonality loss "
            "is added only by META_ARCHITECTURE 'WithACMOrthLoss' (with MODEL.ACM.META_ARCHITECTURE "
            "naming the wrapped one) or by calling acm_d2.attach_acm_orth_loss(model, weight).",
            weight,
            cfg.MODEL.META_ARCHITECTURE,
        )


def _build_acm_resnet(cfg, input_shape: ShapeSpec) -> ACMResNet:
    check_acm_config(cfg)
    plain = build_resnet_backbone(cfg, input_shape)
    return ACMResNet(
        plain.stem,
        [list(stage.children()) for stage in plain.stages],
        out_features=list(plain._out_features),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        acm_stages=list(cfg.MODEL.ACM.STAGES),
        acm_groups=cfg.MODEL.ACM.GROUPS,
        context_module=cfg.MODEL.ACM.MODULE,
        se_reduction=cfg.MODEL.ACM.SE_REDUCTION,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_acm_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + ACM, C4-style (as ``build_resnet_backbone``); res5 of C4 models is in the ROI heads."""
    return _build_acm_resnet(cfg, input_shape)


def _fpn_on(cfg, bottom_up, top_block) -> FPN:
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_acm_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + ACM with FPN, as ``build_resnet_fpn_backbone`` (Mask/Faster R-CNN)."""
    return _fpn_on(cfg, _build_acm_resnet(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_acm_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + ACM with FPN and P6/P7 from res5, as ``build_retinanet_resnet_fpn_backbone``."""
    bottom_up = _build_acm_resnet(cfg, input_shape)
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return _fpn_on(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
