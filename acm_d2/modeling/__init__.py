"""The ACM module, the blocks and backbones that host it, and the loss it feeds.

Importing this package registers the ACM backbones and meta-architectures with Detectron2.
"""
from .acm import ACM, ACM_VARIANTS
from .backbone import build_resnet_acm_backbone, build_resnet_fpn_acm_backbone, build_retinanet_resnet_fpn_acm_backbone
from .blocks import CONTEXT_MODULES, ContextBasicBlock, ContextBottleneckBlock
from .flops import add_acm_flop_handles
from .meta_arch import ACMGeneralizedRCNN, ACMOrthLossMixin, ACMPanopticFPN, ACMRetinaNet, with_acm_orth_loss
from .orth_loss import LOSS_KEY, ORTH_LOSS_MODULES, acm_orth_loss
from .recorder import ACMCall, ACMRecorder
from .reference import ReferenceACM
from .resnet import ACMResNet, acm_modules
from .squeeze_excitation import SqueezeExcitation

__all__ = [
    "ACM",
    "ACM_VARIANTS",
    "ACMCall",
    "ACMGeneralizedRCNN",
    "ACMOrthLossMixin",
    "ACMPanopticFPN",
    "ACMRecorder",
    "ACMResNet",
    "ACMRetinaNet",
    "CONTEXT_MODULES",
    "ContextBasicBlock",
    "ContextBottleneckBlock",
    "LOSS_KEY",
    "ORTH_LOSS_MODULES",
    "ReferenceACM",
    "SqueezeExcitation",
    "acm_modules",
    "acm_orth_loss",
    "add_acm_flop_handles",
    "build_resnet_acm_backbone",
    "build_resnet_fpn_acm_backbone",
    "build_retinanet_resnet_fpn_acm_backbone",
    "with_acm_orth_loss",
]
