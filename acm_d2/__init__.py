"""acm-d2: the Attend-and-Compare Module (Kim et al., ECCV 2020, arXiv 2007.07506) for Detectron2."""
__version__ = "0.3.0"  # the one place of the version (setup.py reads it from here)

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without Detectron2
    raise ImportError(
        "acm_d2 needs Detectron2, which is not on PyPI. Install it from its git repository "
        "(pip install 'git+https://github.com/facebookresearch/detectron2.git'), or run "
        "`make setup` in the acm-d2 checkout, which installs it (set DETECTRON2_SPEC to choose "
        "the pip spec)."
    ) from e

from .config import add_acm_config, get_acm_cfg
from .modeling import (
    ACM,
    ACMGeneralizedRCNN,
    ACMOrthLossMixin,
    ACMPanopticFPN,
    ACMRecorder,
    ACMResNet,
    ACMRetinaNet,
    CONTEXT_MODULE_REGISTRY,
    ContextResNet,
    ReferenceACM,
    SqueezeExcitation,
    acm_modules,
    with_acm_orth_loss,
)

__all__ = [
    "__version__",
    "ACM",
    "ACMGeneralizedRCNN",
    "ACMOrthLossMixin",
    "ACMPanopticFPN",
    "ACMRecorder",
    "ACMResNet",
    "ACMRetinaNet",
    "CONTEXT_MODULE_REGISTRY",
    "ContextResNet",
    "ReferenceACM",
    "SqueezeExcitation",
    "acm_modules",
    "add_acm_config",
    "get_acm_cfg",
    "with_acm_orth_loss",
]
