"""Detectron2's ResNet with a context module (ACM, SE, NL, CC, GC, CBAM, or one of your own)
in chosen blocks: on the residual branch of every block of chosen stages, or after chosen
blocks, as the module's ``PLACEMENT`` says (:mod:`acm_d2.modeling.context`)."""
import logging
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from torch import nn

from .acm import ACM
from .blocks import ContextBasicBlock, ContextBottleneckBlock
from .context import build_context_module, context_module_class

__all__ = ["ACMResNet", "ContextResNet", "acm_modules", "after_block_positions", "context_modules", "context_stages"]

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


#: The blocks an after-block module (NL, CC) follows when MODEL.ACM.AFTER_BLOCKS is empty: the
#: one before the last block of res4, where the non-local paper (arXiv 1711.07971, section 6)
#: and CCNet (arXiv 1811.11721, COCO experiments) put one unit into Mask R-CNN.
DEFAULT_AFTER_BLOCKS = ("res4.-2",)
_BLOCK_NAME = re.compile(r"^(?P<stage>res[2-5])(?:\.(?P<index>-?[0-9]+))?$")


def after_block_positions(
    stage_lengths: Dict[str, int], requested: Optional[Sequence[str]], freeze_at: int
) -> List[Tuple[str, int]]:
    """The (stage, block index) pairs that an after-block module follows, in forward order.

    Args:
        stage_lengths: the ResNet's stages and their number of blocks ({"res2": 3, ...}).
        requested: MODEL.ACM.AFTER_BLOCKS: "resS.i" (block i of stage S, negative i counting
            from the end, as in Python) or "resS" (every block of S); None or empty:
            :data:`DEFAULT_AFTER_BLOCKS`.
        freeze_at: MODEL.BACKBONE.FREEZE_AT; blocks of frozen stages are refused.
    Raises ValueError, naming the setting, for a malformed name, a stage or block the ResNet
    does not have, a frozen stage, or a block named twice.
    """
    names = list(requested) if requested else list(DEFAULT_AFTER_BLOCKS)
    positions: List[Tuple[str, int]] = []
    for name in names:
        match = _BLOCK_NAME.match(str(name))
        if match is None:
            raise ValueError(
                f"MODEL.ACM.AFTER_BLOCKS has {name!r}; each entry is 'resS' (every block of stage S) or 'resS.i' "
                f"(block i of stage S, negative i from the end), S in 2..5, e.g. 'res4.-2'"
            )
        stage = match.group("stage")
        if stage not in stage_lengths:
            raise ValueError(
                f"MODEL.ACM.AFTER_BLOCKS has {name!r}, but this backbone has only the stages {list(stage_lengths)} "
                f"(stages after the last of MODEL.RESNETS.OUT_FEATURES are not built)"
            )
        if int(stage[len("res"):]) <= freeze_at:
            raise ValueError(
                f"MODEL.ACM.AFTER_BLOCKS has {name!r}, but MODEL.BACKBONE.FREEZE_AT={freeze_at} freezes {stage}; a module "
                f"there would keep its initialisation. Name a block of a trained stage or lower FREEZE_AT."
            )
        length = stage_lengths[stage]
        if match.group("index") is None:
            indices = list(range(length))
        else:
            index = int(match.group("index"))
            if not -length <= index < length:
                raise ValueError(
                    f"MODEL.ACM.AFTER_BLOCKS has {name!r}, but {stage} has {length} blocks: i must be in "
                    f"{-length}..{length - 1}"
                )
            indices = [index % length]
        for index in indices:
            if (stage, index) in positions:
                raise ValueError(f"MODEL.ACM.AFTER_BLOCKS names block {stage}.{index} more than once: {names}")
            positions.append((stage, index))
    return sorted(positions)


class ContextResNet(ResNet):
    """:class:`detectron2.modeling.ResNet` whose chosen blocks host a context module.

    Takes ResNet's arguments plus:
        context_module: a name of :data:`CONTEXT_MODULE_REGISTRY` ("ACM", "SE", "NL", "CC",
            "GC", "CBAM", or one registered by the user), or "none" (the plain ResNet through
            the same code, for comparisons; the placement settings are then ignored).
        module_options: the module's keyword arguments (e.g. ``{"groups": 32}`` for ACM).
        module_stages: for a module placed on the residual branch: the stages whose every
            block hosts one; None: every stage not frozen by ``freeze_at`` (see
            :func:`context_stages`).
        after_blocks: for a module placed after blocks: which blocks (see
            :func:`after_block_positions`); None: the one before the last block of res4.

    The chosen blocks become :class:`ContextBottleneckBlock` / :class:`ContextBasicBlock`
    (same convs, same parameter names, plus the child ``context`` or ``context_after``);
    ``forward`` is ResNet's: (N, 3, H, W) -> {"res2": (N, C2, H/4, W/4), ...}.
    """

    def __init__(
        self,
        stem,
        stages,
        num_classes=None,
        out_features=None,
        freeze_at=0,
        *,
        context_module: str = "ACM",
        module_options: Optional[Dict[str, Any]] = None,
        module_stages: Optional[Sequence[str]] = None,
        after_blocks: Optional[Sequence[str]] = None,
    ):
        super().__init__(stem, stages, num_classes=num_classes, out_features=out_features, freeze_at=freeze_at)
        if context_module == "none":
            return
        placement = context_module_class(context_module).PLACEMENT
        if placement == "residual":
            if after_blocks:
                raise ValueError(
                    f"MODEL.ACM.AFTER_BLOCKS {list(after_blocks)} places modules after blocks, but {context_module} goes "
                    f"on the residual branch of every block of MODEL.ACM.STAGES: leave AFTER_BLOCKS empty"
                )
            chosen = context_stages(self.stage_names, module_stages, freeze_at)
            positions = [(stage, index) for stage in chosen for index in range(len(getattr(self, stage)))]
        else:
            if module_stages:
                raise ValueError(
                    f"MODEL.ACM.STAGES {list(module_stages)} places modules on the residual branch, but {context_module} "
                    f"goes after whole blocks: choose them with MODEL.ACM.AFTER_BLOCKS (e.g. ['res4.-2']) and leave "
                    f"STAGES empty"
                )
            lengths = {stage: len(getattr(self, stage)) for stage in self.stage_names}
            positions = after_block_positions(lengths, after_blocks, freeze_at)
        slot = "context" if placement == "residual" else "context_after"
        for stage_name, index in positions:
            stage = getattr(self, stage_name)
            block = stage[index]
            host = _HOST_OF_BLOCK.get(type(block))
            if host is None:
                raise ValueError(
                    f"{stage_name}.{index}: cannot place a context module in a {type(block).__name__}; "
                    f"supported blocks: {[b.__name__ for b in _HOST_OF_BLOCK]} (MODEL.ACM.STAGES, "
                    f"MODEL.ACM.AFTER_BLOCKS, MODEL.RESNETS.DEFORM_ON_PER_STAGE)"
                )
            module = build_context_module(
                context_module, block.out_channels, module_options, where=f"{stage_name}.{index}"
            )
            stage[index] = host.from_block(block, **{slot: module})
        logger.info(
            "%s %s %d blocks (FREEZE_AT=%d): %s", context_module,
            "on the residual branch of" if placement == "residual" else "after", len(positions), freeze_at,
            ", ".join(f"{s}.{i}" for s, i in positions),
        )


class ACMResNet(ContextResNet):
    """:class:`ContextResNet` under its name and keyword arguments of acm-d2 < 0.3, for the
    LazyConfig files that use them: ``acm_stages`` (= ``module_stages``), ``acm_groups``,
    ``acm_variant`` (ACM's ``groups``, ``variant``), ``se_reduction`` (SE's ``reduction``).
    New code uses :class:`ContextResNet` with ``module_options``."""

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
        after_blocks: Optional[Sequence[str]] = None,
    ):
        options = {"ACM": {"groups": acm_groups, "variant": acm_variant}, "SE": {"reduction": se_reduction}}
        super().__init__(
            stem, stages, num_classes=num_classes, out_features=out_features, freeze_at=freeze_at,
            context_module=context_module, module_options=options.get(context_module, {}),
            module_stages=acm_stages, after_blocks=after_blocks,
        )


def context_modules(model: nn.Module, qualified: bool = False) -> "OrderedDict[str, nn.Module]":
    """The context modules of ``model``'s context blocks in forward order, by their path
    ("res3.0.context", "res4.4.context_after"; with ``qualified`` the full path,
    "backbone.bottom_up.res3.0.context")."""
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, block in model.named_modules():
        if isinstance(block, (ContextBottleneckBlock, ContextBasicBlock)):
            for slot in ("context", "context_after"):
                module = getattr(block, slot)
                if module is not None:
                    path = f"{name}.{slot}" if qualified else ".".join(name.split(".")[-2:] + [slot])
                    if path in found:
                        raise ValueError(
                            f"the model has several context modules named {path!r} (several context backbones?); "
                            f"use qualified=True"
                        )
                    found[path] = module
    return found


def acm_modules(model: nn.Module, qualified: bool = False) -> "OrderedDict[str, ACM]":
    """The ACM modules of ``model`` in forward order, by the name of their block.

    With ``qualified`` False the names are short ("res3.0", "res5.2"; the path to the
    ResNet is dropped; a model with several ACM backbones must use ``qualified``), with True
    the block's full name ("backbone.bottom_up.res3.0")."""
    found: "OrderedDict[str, ACM]" = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, ACM):
            block = name[: -len(".context")] if name.endswith(".context") else name
            if not qualified:
                block = ".".join(block.split(".")[-2:]) if "." in block else block
                if block in found:
                    raise ValueError(
                        f"the model has several ACM modules named {block!r} (several ACM backbones?); "
                        f"use acm_modules(model, qualified=True)"
                    )
            found[block] = module
    return found
