"""The ACM module and its peers, the blocks and backbones that host them, and ACM's loss.

Importing this package registers the context modules (ACM, SE, NL, CC, GC, CBAM) in
``CONTEXT_MODULE_REGISTRY`` and the backbones and meta-architectures with Detectron2.
"""
from .acm import ACM, ACM_VARIANTS
from .backbone import build_resnet_acm_backbone, build_resnet_fpn_acm_backbone, build_retinanet_resnet_fpn_acm_backbone
from .blocks import ContextBasicBlock, ContextBottleneckBlock
from .cbam import CBAM
from .context import CONTEXT_MODULE_REGISTRY, PLACEMENTS, build_context_module, context_module_names
from .criss_cross import CrissCrossAttention
from .flops import add_acm_flop_handles
from .global_context import GlobalContextBlock
from .meta_arch import ACMGeneralizedRCNN, ACMOrthLossMixin, ACMPanopticFPN, ACMRetinaNet, with_acm_orth_loss
from .non_local import NonLocalBlock
from .orth_loss import LOSS_KEY, ORTH_LOSS_MODULES, acm_orth_loss
from .recorder import ACMCall, ACMRecorder
from .reference import ReferenceACM
from .resnet import ACMResNet, ContextResNet, acm_modules, context_modules
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
    "CBAM",
    "CONTEXT_MODULE_REGISTRY",
    "ContextBasicBlock",
    "ContextBottleneckBlock",
    "ContextResNet",
    "CrissCrossAttention",
    "GlobalContextBlock",
    "LOSS_KEY",
    "NonLocalBlock",
    "ORTH_LOSS_MODULES",
    "PLACEMENTS",
    "ReferenceACM",
    "SqueezeExcitation",
    "acm_modules",
    "acm_orth_loss",
    "context_module_names",
    "context_modules",
    "add_acm_flop_handles",
    "build_context_module",
    "build_resnet_acm_backbone",
    "build_resnet_fpn_acm_backbone",
    "build_retinanet_resnet_fpn_acm_backbone",
    "with_acm_orth_loss",
]
