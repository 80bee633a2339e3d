"""The ACM orthogonality loss, added to the loss dict of any Detectron2 meta-architecture.

loss_acm_orth = lambda * | mean over the batch of (sum over ACM modules of (K . Q) / C) |,
the formula of the authors' Detectron2 code. It is added by a forward hook on the model, so
GeneralizedRCNN, RetinaNet or a user's own meta-architecture stay unchanged: every training
forward whose output is a dict gets the extra entry.
"""
import logging
import math
from typing import Union

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from pydoc import locate
from torch import nn

from .acm import ACM

__all__ = ["ACMOrthLoss", "attach_acm_orth_loss", "check_orth_loss_weight", "with_acm_orth_loss", "WithACMOrthLoss"]

logger = logging.getLogger(__name__)

LOSS_KEY = "loss_acm_orth"


class ACMOrthLoss:
    """Forward hook on a meta-architecture that adds ``loss_acm_orth`` to its loss dict.

    Args:
        weight: lambda, > 0.
        modules: the ACM modules whose orthogonality terms are summed.
    """

    def __init__(self, weight: float, modules):
        self.weight = weight
        self.modules = list(modules)

    def __call__(self, model: nn.Module, inputs, outputs):
        if not model.training or not isinstance(outputs, dict):
            return outputs
        terms = [m.last_orthogonality for m in self.modules if m.last_orthogonality is not None]
        for m in self.modules:
            m.last_orthogonality = None  # release the graph; the next forward records anew
        if not terms:
            return outputs
        per_sample = torch.stack(terms).sum(dim=0)  # (N,): sum over modules
        outputs[LOSS_KEY] = self.weight * per_sample.mean().abs()
        return outputs


def check_orth_loss_weight(weight) -> float:
    """Return ``weight`` as a float, or raise ValueError unless it is a finite number >= 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"MODEL.ACM.ORTH_LOSS_WEIGHT must be a finite number >= 0, got {weight!r}")
    return float(weight)


def attach_acm_orth_loss(model: nn.Module, weight: float) -> nn.Module:
    """Make every training forward of ``model`` return ``loss_acm_orth`` (lambda = ``weight``).

    With weight 0 nothing is attached and the ACM modules skip the term. Attaching twice
    replaces the earlier hook. Returns ``model``.
    """
    weight = check_orth_loss_weight(weight)
    modules = [m for m in model.modules() if isinstance(m, ACM)]
    for hook_id, hook in list(model._forward_hooks.items()):
        if isinstance(hook, ACMOrthLoss):
            del model._forward_hooks[hook_id]
    for m in modules:
        m.record_orthogonality = weight > 0
    if weight == 0:
        return model
    if not modules:
        raise ValueError(
            f"MODEL.ACM.ORTH_LOSS_WEIGHT={weight} asks for the ACM orthogonality loss, but "
            f"{type(model).__name__} has no ACM module (is the backbone an ACM backbone, "
            f"e.g. build_resnet_fpn_acm_backbone, with MODEL.ACM.MODULE 'ACM'?); for a model "
            f"without ACM (MODULE 'SE' or 'none') set MODEL.ACM.ORTH_LOSS_WEIGHT 0"
        )
    model.register_forward_hook(ACMOrthLoss(weight, modules))
    logger.info("loss_acm_orth: lambda=%s over %d ACM modules", weight, len(modules))
    return model


def with_acm_orth_loss(meta_architecture: Union[str, type], orth_loss_weight: float = 0.1, **kwargs):
    """Build ``meta_architecture(**kwargs)`` and attach the orthogonality loss.

    For LazyConfig: keep a model config's keyword arguments and set
    ``model._target_ = with_acm_orth_loss`` with ``model.meta_architecture`` the class (or its
    dotted name) and ``model.orth_loss_weight`` lambda; ``model.backbone`` etc. keep their paths.
    """
    if isinstance(meta_architecture, str):
        cls = locate(meta_architecture)
        if cls is None:
            raise ValueError(f"meta_architecture {meta_architecture!r} is not an importable name")
        meta_architecture = cls
    return attach_acm_orth_loss(meta_architecture(**kwargs), orth_loss_weight)


@META_ARCH_REGISTRY.register()
def WithACMOrthLoss(cfg):
    """MODEL.META_ARCHITECTURE "WithACMOrthLoss": builds MODEL.ACM.META_ARCHITECTURE from the
    registry (GeneralizedRCNN, RetinaNet, ...) and attaches ``loss_acm_orth`` with lambda =
    MODEL.ACM.ORTH_LOSS_WEIGHT. The model returned is that meta-architecture itself, so its
    state dict keys are unchanged."""
    inner = cfg.MODEL.ACM.META_ARCHITECTURE
    if inner == "WithACMOrthLoss":
        raise ValueError("MODEL.ACM.META_ARCHITECTURE must name the wrapped meta-architecture, not WithACMOrthLoss")
    model = META_ARCH_REGISTRY.get(inner)(cfg)
    return attach_acm_orth_loss(model, cfg.MODEL.ACM.ORTH_LOSS_WEIGHT)
