"""Detectron2's ResNet with a context module (ACM or SE) on the residual branch of its blocks."""
import logging
from typing import Optional, Sequence

from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
)

from .acm import ACM, check_acm_channels
from .squeeze_excitation import SqueezeExcitation

__all__ = ["ACMResNet", "CONTEXT_MODULES", "insert_context_modules", "default_acm_stages"]

logger = logging.getLogger(__name__)

# The modules a block can host, by the name used in MODEL.ACM.MODULE. "none" hosts nothing,
# which gives the plain backbone through the same code, for comparisons.
CONTEXT_MODULES = ("ACM", "SE", "none")

# The last conv (with its norm) of each block kind: the context module goes on its output,
# before the shortcut is added (the placement of SE and of the ACM authors).
_LAST_CONV_OF_BLOCK = {BottleneckBlock: "conv3", DeformBottleneckBlock: "conv3", BasicBlock: "conv2"}


def default_acm_stages(stage_names: Sequence[str], freeze_at: int):
    """The stages that are trained: ``res{i}`` with i > freeze_at (res3-res5 for FREEZE_AT=2)."""
    return [name for name in stage_names if int(name[len("res"):]) > freeze_at]


def insert_context_modules(
    resnet: ResNet,
    stages: Optional[Sequence[str]],
    freeze_at: int,
    module: str = "ACM",
    acm_groups: int = 32,
    se_reduction: int = 16,
):
    """Put one context module in every block of ``stages`` of ``resnet`` (in place).

    The module is registered as the block's child ``acm`` or ``se`` and applied to the output
    of the block's last conv + norm through a forward hook; the ResNet's own parameter names
    do not change, so plain ResNet checkpoints load.

    Args:
        stages: stage names ("res2".."res5"); None or empty: every stage not frozen.
        freeze_at: the ResNet's freeze_at; asking for a frozen stage is an error.
        module: one of ``CONTEXT_MODULES``.
    Returns:
        list[(str, nn.Module)]: "res3.0"-style block names and the modules inserted.
    """
    if module not in CONTEXT_MODULES:
        raise ValueError(f"MODEL.ACM.MODULE must be one of {list(CONTEXT_MODULES)}, got {module!r}")
    available = list(resnet.stage_names)
    if not stages:
        stages = default_acm_stages(available, freeze_at)
    unknown = [s for s in stages if s not in available]
    if unknown:
        c4_hint = ""
        if "res5" in unknown and "res4" in available:
            c4_hint = (
                ". In C4 models (OUT_FEATURES ['res4']) res5 is not in the backbone but in the ROI heads "
                "(Res5ROIHeads), which get no ACM: drop 'res5' or use an FPN model"
            )
        raise ValueError(
            f"MODEL.ACM.STAGES has {unknown}, which this backbone does not have; valid stages "
            f"here: {available} (stages after the last of MODEL.RESNETS.OUT_FEATURES are not built)"
            f"{c4_hint}"
        )
    frozen = [s for s in stages if int(s[len("res"):]) <= freeze_at]
    if frozen:
        raise ValueError(
            f"MODEL.ACM.STAGES asks for {frozen}, but MODEL.BACKBONE.FREEZE_AT={freeze_at} freezes "
            f"them; a context module in a frozen stage would keep its random initialisation. Use "
            f"trained stages ({default_acm_stages(available, freeze_at)}) or lower FREEZE_AT."
        )
    if module == "none":
        return []
    inserted = []
    for stage_name in stages:
        for index, block in enumerate(getattr(resnet, stage_name)):
            block_name = f"{stage_name}.{index}"
            conv_name = _LAST_CONV_OF_BLOCK.get(type(block))
            if conv_name is None:
                raise ValueError(
                    f"{block_name}: cannot place a context module in a {type(block).__name__}; "
                    f"supported blocks: {[c.__name__ for c in _LAST_CONV_OF_BLOCK]}"
                )
            channels = block.out_channels
            if module == "ACM":
                check_acm_channels(channels, acm_groups, where=f"{block_name} ({stage_name})")
                context = ACM(channels, groups=acm_groups)
            else:
                context = SqueezeExcitation(channels, reduction=se_reduction)
            block.add_module(module.lower(), context)
            getattr(block, conv_name).register_forward_hook(context.apply_to_output)
            inserted.append((block_name, context))
    logger.info(
        "Inserted %d %s modules in %s (FREEZE_AT=%d)", len(inserted), module, list(stages), freeze_at
    )
    return inserted


class ACMResNet(ResNet):
    """:class:`detectron2.modeling.ResNet` with ACM (or SE) in the blocks of chosen stages.

    Takes ResNet's arguments plus:
        acm_stages: stage names to host a module; None: every stage not frozen by freeze_at.
        acm_groups: G of every ACM.
        context_module: "ACM", "SE" or "none" (the plain ResNet, for comparisons).
        se_reduction: the SE reduction ratio.

    Inputs and outputs are those of ResNet: (N, 3, H, W) -> dict of (N, C_s, H/s, W/s).
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
        acm_groups: int = 32,
        context_module: str = "ACM",
        se_reduction: int = 16,
    ):
        super().__init__(stem, stages, num_classes=num_classes, out_features=out_features, freeze_at=freeze_at)
        # "res3.0"-style block name -> its context module (also a child of that block).
        self.context_modules_by_block = dict(
            insert_context_modules(
                self,
                acm_stages,
                freeze_at,
                module=context_module,
                acm_groups=acm_groups,
                se_reduction=se_reduction,
            )
        )
