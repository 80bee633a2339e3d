"""Detectron2's ResNet blocks with context modules, called in the blocks' own ``forward``.

A block has two places for a context module (see :mod:`acm_d2.modeling.context`):

* ``context``: on the residual branch, after the last conv + norm and before the shortcut is
  added (the placement of SE and of the ACM authors; GC and CBAM too);
* ``context_after``: after the whole block, i.e. after its add and ReLU (a non-local or
  criss-cross unit between two blocks, as their papers put them into Mask R-CNN).

Either is None when absent. Every other parameter keeps Detectron2's name, so plain ResNet
checkpoints load and only the context modules' keys are missing; the keys of earlier layouts
(the authors' ``module.*``, acm-d2's ``acm.*`` / ``se.*`` before 0.3) load into ``context``.
Blocks are built like Detectron2's (``ResNet.make_stage(block_class=..., context=...)``) or
from an existing block (:meth:`from_block`, which takes over its convs).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from torch import nn

from ..authors_layout import rename_authors_block_keys

__all__ = ["ContextBasicBlock", "ContextBottleneckBlock"]

class _HostsContextModules:
    """The children ``context`` and ``context_after`` of a block, and the earlier key names.

    Keyword arguments, besides the Detectron2 block's: ``context`` and ``context_after``, each
    an ``nn.Module`` mapping (N, C_out, H, W) to the same shape, or None.
    """

    def __init__(self, in_channels, out_channels, *, context: Optional[nn.Module] = None,
                 context_after: Optional[nn.Module] = None, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self.context = context
        self.context_after = context_after

    @classmethod
    def from_block(cls, block: CNNBlockBase, context: Optional[nn.Module] = None,
                   context_after: Optional[nn.Module] = None):
        """A block of this class that takes over the children (convs, norms, shortcut) of
        ``block``, a Detectron2 block of the matching kind, and hosts ``context`` on its
        residual branch and ``context_after`` after it (either may be None)."""
        host = cls.__new__(cls)
        CNNBlockBase.__init__(host, block.in_channels, block.out_channels, block.stride)
        host.shortcut = None
        for name, child in block.named_children():
            setattr(host, name, child)
        host.context = context
        host.context_after = context_after
        return host.train(block.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The authors' fork named the module ``module``, acm-d2 < 0.3 ``acm`` / ``se``: their
        keys load into ``context``. A ``context`` with an ``identity_input_scale`` s != 1 (an
        ACM with MODEL.ACM.INIT "identity": s = 2, for its P = 1/2) is the identity at
        initialisation for inputs scaled by s: when the state dict has no ``context`` keys (a
        network without context modules loads), the affine weight and bias of the last norm
        (of the last conv, without a norm) load multiplied by s, exactly."""
        rename_authors_block_keys(state_dict, prefix)
        self._scale_for_identity_context(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scale_for_identity_context(self, state_dict, prefix) -> None:
        scale = getattr(self.context, "identity_input_scale", 1.0)
        if scale == 1.0 or any(key.startswith(f"{prefix}context.") for key in state_dict):
            return
        name = "conv3" if isinstance(self, BottleneckBlock) else "conv2"
        norm = getattr(getattr(self, name), "norm", None)
        if norm is not None:
            if getattr(norm, "weight", None) is None:
                raise ValueError(
                    f"{prefix}{name}.norm: MODEL.ACM.INIT 'identity' scales the affine weight and bias of the norm "
                    f"before ACM, and {type(norm).__name__} has none; use MODEL.ACM.INIT 'authors' or an affine norm"
                )
            name += ".norm"
        for key in (f"{prefix}{name}.weight", f"{prefix}{name}.bias"):
            if key in state_dict:
                state_dict[key] = state_dict[key] * scale  # a new tensor: the caller's stays as it was


class ContextBottleneckBlock(_HostsContextModules, BottleneckBlock):
    """Detectron2's :class:`BottleneckBlock` (1x1, 3x3, 1x1 convs, projection shortcut if
    needed) with a context module after conv3 + norm and/or one after the block.

    Arguments: those of :class:`BottleneckBlock`, plus ``context`` and ``context_after``.
    Input (N, C_in, H, W) -> output (N, C_out, H / stride, W / stride).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)
        out = F.relu_(out)
        out = self.conv3(out)  # conv + norm
        if self.context is not None:
            out = self.context(out)  # on the residual branch
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out += shortcut
        out = F.relu_(out)
        if self.context_after is not None:
            out = self.context_after(out)  # after the whole block
        return out


class ContextBasicBlock(_HostsContextModules, BasicBlock):
    """Detectron2's :class:`BasicBlock` (two 3x3 convs, projection shortcut if needed; R-18
    and R-34) with a context module after conv2 + norm and/or one after the block. Arguments
    as :class:`ContextBottleneckBlock`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)  # conv + norm
        if self.context is not None:
            out = self.context(out)  # on the residual branch
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out += shortcut
        out = F.relu_(out)
        if self.context_after is not None:
            out = self.context_after(out)  # after the whole block
        return out
