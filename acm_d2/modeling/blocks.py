"""Detectron2's ResNet blocks with a context module (ACM or SE) on the residual branch.

Each block is Detectron2's block with its own ``forward``, in which the context module runs
after the last conv + norm and before the shortcut is added (the placement of SE and of the
ACM authors). The module is the block's child ``acm`` (or ``se``); every other parameter keeps
Detectron2's name, so plain ResNet checkpoints load and only the context module's keys are
missing. Blocks are built like Detectron2's (``ResNet.make_stage(block_class=...)``) or from
an existing block (:meth:`from_block`, which takes over its convs).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from torch import nn

from ..authors_layout import rename_authors_block_keys
from .acm import ACM, check_acm_settings
from .squeeze_excitation import SqueezeExcitation

__all__ = ["CONTEXT_MODULES", "ContextBasicBlock", "ContextBottleneckBlock", "build_context_module"]

#: The modules a block can host, by the name used in MODEL.ACM.MODULE. "none" hosts nothing:
#: the plain backbone through the same code, for comparisons.
CONTEXT_MODULES = ("ACM", "SE", "none")


def build_context_module(
    kind: str,
    channels: int,
    *,
    acm_groups: int = 32,
    acm_variant: str = "P(X+(K-Q))",
    se_reduction: int = 16,
    where: str = "block",
) -> Optional[nn.Module]:
    """The module of ``kind`` (one of :data:`CONTEXT_MODULES`) for ``channels`` channels, or
    None for "none". ``where`` names the block in error messages."""
    if kind == "ACM":
        check_acm_settings(channels, acm_groups, acm_variant, where=where)
        return ACM(channels, groups=acm_groups, variant=acm_variant)
    if kind == "SE":
        return SqueezeExcitation(channels, reduction=se_reduction)
    if kind == "none":
        return None
    raise ValueError(f"{where}: MODEL.ACM.MODULE must be one of {list(CONTEXT_MODULES)}, got {kind!r}")


class _HostsContextModule:
    """The child ``acm`` / ``se`` of a block (None when absent), and the authors' key names.

    Keyword arguments, besides the Detectron2 block's: ``context_module`` (one of
    :data:`CONTEXT_MODULES`), ``acm_groups``, ``acm_variant``, ``se_reduction``.
    """

    def __init__(self, in_channels, out_channels, *, context_module: str = "ACM", acm_groups: int = 32,
                 acm_variant: str = "P(X+(K-Q))", se_reduction: int = 16, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._set_context_module(
            build_context_module(context_module, out_channels, acm_groups=acm_groups, acm_variant=acm_variant,
                                 se_reduction=se_reduction)
        )

    def _set_context_module(self, module: Optional[nn.Module]) -> None:
        self.acm = module if isinstance(module, ACM) else None
        self.se = module if isinstance(module, SqueezeExcitation) else None

    @classmethod
    def from_block(cls, block: CNNBlockBase, context_module: str = "ACM", **options):
        """A block of this class that takes over the children (convs, norms, shortcut) of
        ``block``, a Detectron2 block of the matching kind, and hosts a new context module.
        ``options``: the keyword arguments of :func:`build_context_module`."""
        host = cls.__new__(cls)
        CNNBlockBase.__init__(host, block.in_channels, block.out_channels, block.stride)
        host.shortcut = None
        for name, child in block.named_children():
            setattr(host, name, child)
        host._set_context_module(build_context_module(context_module, block.out_channels, **options))
        return host.train(block.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The authors' fork named the module ``module``: its keys load into ``acm``."""
        rename_authors_block_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ContextBottleneckBlock(_HostsContextModule, BottleneckBlock):
    """Detectron2's :class:`BottleneckBlock` (1x1, 3x3, 1x1 convs, projection shortcut if
    needed) with a context module after conv3 + norm.

    Arguments: those of :class:`BottleneckBlock`, plus ``context_module`` (one of
    :data:`CONTEXT_MODULES`) and ``acm_groups``, ``acm_variant``, ``se_reduction``.
    Input (N, C_in, H, W) -> output (N, C_out, H / stride, W / stride).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)
        out = F.relu_(out)
        out = self.conv3(out)  # conv + norm
        if self.acm is not None:
            out = self.acm(out)  # the context module, on the residual branch
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out += shortcut
        return F.relu_(out)


class ContextBasicBlock(_HostsContextModule, BasicBlock):
    """Detectron2's :class:`BasicBlock` (two 3x3 convs, projection shortcut if needed; R-18
    and R-34) with a context module after conv2 + norm. Arguments as
    :class:`ContextBottleneckBlock`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)  # conv + norm
        if self.acm is not None:
            out = self.acm(out)  # the context module, on the residual branch
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out += shortcut
        return F.relu_(out)
