"""Backbone builders with context modules, registered in Detectron2's BACKBONE_REGISTRY.

Each builder is Detectron2's builder of the same name without ``_acm``: Detectron2 builds
the ResNet from MODEL.RESNETS, and :class:`ContextResNet` puts the context module of
MODEL.ACM (ACM or a peer: MODEL.ACM.MODULE) into its blocks (same convs, same parameter
names). The names keep ``_acm`` for the configs that use them, whatever the module.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .meta_arch import ACMOrthLossMixin
from .orth_loss import check_orth_loss_weight
from .context import check_unread_settings, context_module_class, context_module_options
from .resnet import ContextResNet

__all__ = [
    "build_resnet_acm_backbone",
    "build_resnet_fpn_acm_backbone",
    "build_retinanet_resnet_fpn_acm_backbone",
    "check_acm_config",
]

_RESNET_DEPTHS = (18, 34, 50, 101, 152)


def check_acm_config(cfg) -> None:
    """Raise ValueError for settings of MODEL.ACM / MODEL.RESNETS that ACM cannot honour,
    naming the setting and the allowed values."""
    acm = cfg.MODEL.ACM
    if acm.MODULE != "none":
        context_module_class(acm.MODULE)  # refuses an unknown name, listing the allowed ones
    check_unread_settings(acm)  # e.g. INIT "identity" with SE, which has no init setting
    weight = check_orth_loss_weight(acm.ORTH_LOSS_WEIGHT)
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RESNET_DEPTHS:
        raise ValueError(f"The ACM backbones are ResNets: MODEL.RESNETS.DEPTH must be one of {list(_RESNET_DEPTHS)}, got {depth!r}")
    if not 0 <= cfg.MODEL.BACKBONE.FREEZE_AT <= 5:
        raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be in 0..5 (0: train all, 1: stem, 2: stem and res2, ...), got {cfg.MODEL.BACKBONE.FREEZE_AT!r}")
    name = cfg.MODEL.META_ARCHITECTURE
    meta_architecture = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
    if (
        weight > 0
        and acm.MODULE == "ACM"
        and isinstance(meta_architecture, type)
        and not issubclass(meta_architecture, ACMOrthLossMixin)
    ):
        raise ValueError(
            f"MODEL.ACM.ORTH_LOSS_WEIGHT={weight} asks for loss_acm_orth, but MODEL.META_ARCHITECTURE {name!r} does not "
            f"add it. Use an ACM meta-architecture (ACMGeneralizedRCNN, ACMRetinaNet, ACMPanopticFPN, or your own "
            f"made with acm_d2.with_acm_orth_loss), or set MODEL.ACM.ORTH_LOSS_WEIGHT 0"
        )


def _build_acm_resnet(cfg, input_shape: ShapeSpec) -> ContextResNet:
    check_acm_config(cfg)
    plain = build_resnet_backbone(cfg, input_shape)
    acm = cfg.MODEL.ACM
    return ContextResNet(
        plain.stem,
        [list(stage.children()) for stage in plain.stages],
        out_features=list(plain.output_shape()),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        context_module=acm.MODULE,
        module_options=context_module_options(acm),
        module_stages=list(acm.STAGES),
        after_blocks=list(acm.AFTER_BLOCKS),
    )


@BACKBONE_REGISTRY.register()
def build_resnet_acm_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + a context module, C4-style (as ``build_resnet_backbone``); res5 of C4 models is in the ROI heads."""
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
    """ResNet + a context module with FPN, as ``build_resnet_fpn_backbone`` (Mask/Faster R-CNN)."""
    return _fpn_on(cfg, _build_acm_resnet(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_acm_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + a context module with FPN and P6/P7 from res5, as ``build_retinanet_resnet_fpn_backbone``."""
    bottom_up = _build_acm_resnet(cfg, input_shape)
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return _fpn_on(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
