"""ACM modules, the ACM ResNet backbones (registered on import) and the orthogonality loss."""
from .acm import ACM
from .backbone import (
    build_resnet_acm_backbone,
    build_resnet_fpn_acm_backbone,
    build_retinanet_resnet_fpn_acm_backbone,
)
from .flops import add_acm_flop_handles
from .orth_loss import attach_acm_orth_loss, with_acm_orth_loss
from .reference import ReferenceACM
from .resnet import ACMResNet, insert_context_modules
from .squeeze_excitation import SqueezeExcitation
