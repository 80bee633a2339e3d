"""Meta-architectures whose training loss dict has ``loss_acm_orth``.

:class:`ACMOrthLossMixin` goes in front of a Detectron2 meta-architecture; its ``forward``
is the meta-architecture's, inside an :class:`ACMRecorder`, plus the loss entry:

    with ACMRecorder() as recorder:
        losses = super().forward(batched_inputs)
    losses["loss_acm_orth"] = acm_orth_loss(recorder.calls, ...)

Registered in META_ARCH_REGISTRY (the class is the model's type, its state dict keys are the
base class's): ``ACMGeneralizedRCNN`` (Faster / Mask / Cascade / Keypoint R-CNN, PointRend),
``ACMRetinaNet``, ``ACMPanopticFPN``. For a meta-architecture of your own, one call:
``META_ARCH_REGISTRY.register(with_acm_orth_loss(MyArch))`` (registered as "ACMMyArch").
"""
import logging
from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, PanopticFPN, RetinaNet
from torch import nn

from .orth_loss import LOSS_KEY, ORTH_LOSS_MODULES, acm_orth_loss, check_orth_loss_weight, stage_of_block
from .recorder import ACMRecorder
from .resnet import acm_modules

__all__ = ["ACMGeneralizedRCNN", "ACMOrthLossMixin", "ACMPanopticFPN", "ACMRetinaNet", "with_acm_orth_loss"]

logger = logging.getLogger(__name__)


class ACMOrthLossMixin:
    """Adds ``loss_acm_orth`` to the training loss dict of the meta-architecture after it.

    Keyword arguments (besides the meta-architecture's; from a config:
    MODEL.ACM.ORTH_LOSS_WEIGHT and MODEL.ACM.ORTH_LOSS_MODULES):
        orth_loss_weight: lambda, >= 0; 0 leaves the loss dict as it is.
        orth_loss_modules: "all" (the paper's equation 6) or "res5" (the authors' Detectron2
            code); see :mod:`acm_d2.modeling.orth_loss`.
    """

    @configurable
    def __init__(self, *, orth_loss_weight: float = 0.1, orth_loss_modules: str = "all", **kwargs):
        super().__init__(**kwargs)
        self.orth_loss_weight = check_orth_loss_weight(orth_loss_weight)
        if orth_loss_modules not in ORTH_LOSS_MODULES:
            raise ValueError(
                f"MODEL.ACM.ORTH_LOSS_MODULES must be one of {list(ORTH_LOSS_MODULES)}, got {orth_loss_modules!r}"
            )
        self.orth_loss_modules = orth_loss_modules
        if self.orth_loss_weight > 0:
            self._check_orth_loss_modules()

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(orth_loss_weight=cfg.MODEL.ACM.ORTH_LOSS_WEIGHT, orth_loss_modules=cfg.MODEL.ACM.ORTH_LOSS_MODULES)
        return ret

    def _check_orth_loss_modules(self) -> None:
        """Refuse at build time a loss that could not be computed."""
        names = self._acm_block_names()
        weight = self.orth_loss_weight
        if not names:
            raise ValueError(
                f"MODEL.ACM.ORTH_LOSS_WEIGHT={weight} asks for the ACM orthogonality loss, but {type(self).__name__} "
                f"has no ACM module (is the backbone an ACM backbone, e.g. build_resnet_fpn_acm_backbone, with "
                f"MODEL.ACM.MODULE 'ACM'?); for a model without ACM (MODULE 'SE' or 'none') set "
                f"MODEL.ACM.ORTH_LOSS_WEIGHT 0"
            )
        without_kq = sorted({m.variant for m in names if m.variant not in ("P(X+(K-Q))", "X+(K-Q)")})
        if without_kq:
            raise ValueError(
                f"MODEL.ACM.ORTH_LOSS_WEIGHT={weight}, but the ACM variant {without_kq} has no K or no Q, so no "
                f"orthogonality term; set MODEL.ACM.ORTH_LOSS_WEIGHT 0"
            )
        stages = sorted({stage_of_block(n) for n in names.values()})
        if self.orth_loss_modules != "all" and self.orth_loss_modules not in stages:
            raise ValueError(
                f"MODEL.ACM.ORTH_LOSS_MODULES {self.orth_loss_modules!r} (the authors' Detectron2 objective: the "
                f"modules of res5) needs ACM modules in res5, but this model has them in {stages} (a C4 model keeps "
                f"res5 in its ROI heads, which have no ACM; the authors' code has no C4 equivalent); use 'all'"
            )
        logger.info(
            "loss_acm_orth: lambda=%s over %s ACM modules (MODEL.ACM.ORTH_LOSS_MODULES %r)",
            weight, sum(1 for n in names.values() if self.orth_loss_modules in ("all", stage_of_block(n))),
            self.orth_loss_modules,
        )

    def _acm_block_names(self) -> Dict[nn.Module, str]:
        return {module: name for name, module in acm_modules(self, qualified=True).items()}

    @torch.jit.unused  # scripting compiles the meta-architecture (see __prepare_scriptable__)
    def forward(self, batched_inputs):
        """The meta-architecture's forward; in training, its loss dict plus ``loss_acm_orth``."""
        if not self.training or self.orth_loss_weight == 0:
            return super().forward(batched_inputs)
        with ACMRecorder() as recorder:
            losses = super().forward(batched_inputs)
        if not isinstance(losses, dict):
            raise TypeError(
                f"{type(self).__name__}: loss_acm_orth goes into the loss dict of the training forward, but "
                f"{type(self).__mro__[2].__name__}.forward returned a {type(losses).__name__}; the mixin needs a "
                f"meta-architecture whose training forward returns a dict of losses"
            )
        losses[LOSS_KEY] = acm_orth_loss(recorder.calls, self._acm_block_names(), self.orth_loss_weight, self.orth_loss_modules)
        return losses

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles in place of this model: the same model (shared
        submodules, parameters and buffers) as an instance of the meta-architecture after the
        mixin, because the loss is computed in Python (the recorder) and TorchScript cannot
        compile ``super()``. The scripted model is then exactly the meta-architecture's, with
        its ``inference`` (Detectron2's ``scripting_with_instances(model, fields)``, and
        ``export_model.py --export-method scripting``).

        The class of that view is a subclass of the meta-architecture made for it, which takes
        this class's annotation of ``training`` (``torch.jit.Final[bool]`` under Detectron2's
        ``freeze_training_mode``, so that the training branch is compiled away)."""
        mro = type(self).__mro__
        meta_arch = mro[mro.index(ACMOrthLossMixin) + 1]  # e.g. GeneralizedRCNN, RetinaNet
        scriptable = _SCRIPTABLE_CLASSES.get(meta_arch)
        if scriptable is None:
            scriptable = type(meta_arch.__name__, (meta_arch,), {"__module__": __name__, "__annotations__": {}})
            _SCRIPTABLE_CLASSES[meta_arch] = scriptable
        scriptable.__annotations__["training"] = type(self).__annotations__.get("training", bool)
        view = scriptable.__new__(scriptable)
        view.__dict__.update(self.__dict__)
        view.__dict__["_modules"] = type(self._modules)(self._modules)  # torch replaces prepared children in it
        return view


#: The classes of the views that :meth:`ACMOrthLossMixin.__prepare_scriptable__` hands to
#: TorchScript, one per meta-architecture.
_SCRIPTABLE_CLASSES: Dict[type, type] = {}


def with_acm_orth_loss(meta_architecture: type) -> type:
    """``meta_architecture`` (a Detectron2-style meta-architecture class with a
    ``@configurable`` ``__init__``) with :class:`ACMOrthLossMixin` in front: a subclass named
    ``ACM<name>``. Register it with ``META_ARCH_REGISTRY.register(...)`` to use it by name."""
    if not isinstance(meta_architecture, type) or not issubclass(meta_architecture, nn.Module):
        raise TypeError(f"with_acm_orth_loss expects a meta-architecture class, got {meta_architecture!r}")
    return type(f"ACM{meta_architecture.__name__}", (ACMOrthLossMixin, meta_architecture), {"__module__": __name__})


@META_ARCH_REGISTRY.register()
class ACMGeneralizedRCNN(ACMOrthLossMixin, GeneralizedRCNN):
    """:class:`GeneralizedRCNN` (Faster / Mask / Cascade / Keypoint R-CNN, PointRend) plus
    ``loss_acm_orth``."""


@META_ARCH_REGISTRY.register()
class ACMRetinaNet(ACMOrthLossMixin, RetinaNet):
    """:class:`RetinaNet` plus ``loss_acm_orth``."""


@META_ARCH_REGISTRY.register()
class ACMPanopticFPN(ACMOrthLossMixin, PanopticFPN):
    """:class:`PanopticFPN` plus ``loss_acm_orth``."""
