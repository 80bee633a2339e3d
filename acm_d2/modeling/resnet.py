"""Detectron2's ResNet with a context module (ACM or SE) in the blocks of chosen stages."""
import logging
from collections import OrderedDict
from typing import List, Optional, Sequence

from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from torch import nn

from .acm import ACM
from .blocks import CONTEXT_MODULES, ContextBasicBlock, ContextBottleneckBlock

__all__ = ["ACMResNet", "acm_modules", "context_stages"]

logger = logging.getLogger(__name__)

# Detectron2's block kind -> the same block hosting a context module.
_HOST_OF_BLOCK = {BottleneckBlock: ContextBottleneckBlock, BasicBlock: ContextBasicBlock}


def context_stages(stage_names: Sequence[str], requested: Optional[Sequence[str]], freeze_at: int) -> List[str]:
    """The stages of a ResNet that get a context module.

    Args:
        stage_names: the stages the ResNet has ("res2".."res5"; those after its last output
            feature are not built).
        requested: MODEL.ACM.STAGES; None or empty: every stage not frozen by ``freeze_at``
            (res3-res5 for FREEZE_AT 2, the authors' choice).
        freeze_at: MODEL.BACKBONE.FREEZE_AT.
    Raises ValueError, naming the setting, for a stage the ResNet does not have, a frozen
    stage, a stage listed twice, or no stage at all.
    """
    trained = [s for s in stage_names if int(s[len("res"):]) > freeze_at]
    if not requested:
        if not trained:
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT={freeze_at} freezes every stage of this backbone ({list(stage_names)}), "
                f"so no block can host a context module; lower FREEZE_AT (0-{len(stage_names)}), or use "
                f"MODEL.ACM.MODULE 'none' for the plain backbone"
            )
        return trained
    requested = list(requested)
    repeated = sorted({s for s in requested if requested.count(s) > 1})
    if repeated:
        raise ValueError(f"MODEL.ACM.STAGES lists {repeated} more than once: {requested}; name each stage once")
    unknown = [s for s in requested if s not in stage_names]
    if unknown:
        c4_hint = ""
        if "res5" in unknown and "res4" in stage_names:
            c4_hint = (
                ". In C4 models (OUT_FEATURES ['res4']) res5 is not in the backbone but in the ROI heads "
                "(Res5ROIHeads), which get no ACM: drop 'res5' or use an FPN model"
            )
        raise ValueError(
            f"MODEL.ACM.STAGES has {unknown}, which this backbone does not have; valid stages here: "
            f"{list(stage_names)} (stages after the last of MODEL.RESNETS.OUT_FEATURES are not built){c4_hint}"
        )
    frozen = [s for s in requested if s not in trained]
    if frozen:
        raise ValueError(
            f"MODEL.ACM.STAGES asks for {frozen}, but MODEL.BACKBONE.FREEZE_AT={freeze_at} freezes them; a "
            f"context module in a frozen stage would keep its random initialisation. Use trained stages "
            f"({trained}) or lower FREEZE_AT."
        )
    return requested


class ACMResNet(ResNet):
    """:class:`detectron2.modeling.ResNet` whose blocks in chosen stages host ACM (or SE).

    Takes ResNet's arguments plus:
        acm_stages: stage names whose every block hosts a module; None: every stage not
            frozen by ``freeze_at`` (see :func:`context_stages`).
        context_module: "ACM", "SE" or "none" (the plain ResNet, for comparisons).
        acm_groups, acm_variant: G and the variant of every ACM (:class:`acm_d2.ACM`).
        se_reduction: the reduction ratio of SE.

    The blocks of those stages become :class:`ContextBottleneckBlock` /
    :class:`ContextBasicBlock` (same convs, same parameter names, plus the child ``acm`` or
    ``se``); ``forward`` is ResNet's: (N, 3, H, W) -> {"res2": (N, C2, H/4, W/4), ...}.
    """

    def __init__(
        self,
        stem,
        stages,
        num_classes=None,
        out_features=None,
        freeze_at=0,
        *,
        acm_stages: Optional[Sequence[str]] = None,
        context_module: str = "ACM",
        acm_groups: int = 32,
        acm_variant: str = "P(X+(K-Q))",
        se_reduction: int = 16,
    ):
        super().__init__(stem, stages, num_classes=num_classes, out_features=out_features, freeze_at=freeze_at)
        if context_module not in CONTEXT_MODULES:
            raise ValueError(f"MODEL.ACM.MODULE must be one of {list(CONTEXT_MODULES)}, got {context_module!r}")
        if context_module == "none":
            return
        chosen = context_stages(self.stage_names, acm_stages, freeze_at)
        for stage_name in chosen:
            stage = getattr(self, stage_name)
            for index, block in enumerate(stage):
                host = _HOST_OF_BLOCK.get(type(block))
                if host is None:
                    raise ValueError(
                        f"{stage_name}.{index}: cannot place a context module in a {type(block).__name__}; "
                        f"supported blocks: {[b.__name__ for b in _HOST_OF_BLOCK]} (MODEL.ACM.STAGES, "
                        f"MODEL.RESNETS.DEFORM_ON_PER_STAGE)"
                    )
                stage[index] = host.from_block(
                    block, context_module, acm_groups=acm_groups, acm_variant=acm_variant,
                    se_reduction=se_reduction, where=f"{stage_name}.{index}",
                )
        logger.info(
            "%s in every block of %s (FREEZE_AT=%d): %d modules",
            context_module, chosen, freeze_at, sum(len(getattr(self, s)) for s in chosen),
        )


def acm_modules(model: nn.Module, qualified: bool = False) -> "OrderedDict[str, ACM]":
    """The ACM modules of ``model`` in forward order, by the name of their block.

    With ``qualified`` False the names are short ("res3.0", "res5.2"; the path to the
    ResNet is dropped; a model with several ACM backbones must use ``qualified``), with True
    the block's full name ("backbone.bottom_up.res3.0")."""
    found: "OrderedDict[str, ACM]" = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, ACM):
            block = name[: -len(".acm")] if name.endswith(".acm") else name
            if not qualified:
                block = ".".join(block.split(".")[-2:]) if "." in block else block
                if block in found:
                    raise ValueError(
                        f"the model has several ACM modules named {block!r} (several ACM backbones?); "
                        f"use acm_modules(model, qualified=True)"
                    )
            found[block] = module
    return found
