"""Convolutional Block Attention Module (Woo, Park, Lee, Kweon, "CBAM: Convolutional Block
Attention Module", ECCV 2018, arXiv 1807.06521), a context module the ACM paper compares
itself with in its related work.

For X of shape (N, C, H, W), channel attention then spatial attention:

* M_c = sigmoid(MLP(AvgPool_hw X) + MLP(MaxPool_hw X)), (N, C, 1, 1); the MLP is shared,
  C -> C / r -> C with a ReLU (1x1 convs with bias; r = 16 in the paper); X' = M_c * X;
* M_s = sigmoid(f7x7([MaxPool_c X'; AvgPool_c X'])), (N, 1, H, W): a 7x7 conv over the
  channel-wise max and mean (2 -> 1 channels, no bias, followed by a norm as the reference
  code's BatchNorm); Y = M_s * X'.

Convolutions keep PyTorch's default initialisation (as the reference code).

Placement (the paper's ResNet setting, used for its COCO detectors): on the residual branch
of every block, after the last conv + norm and before the shortcut add.
"""
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .context import CONTEXT_MODULE_REGISTRY
from .recorder import report_acm_call

__all__ = ["CBAM"]

#: Norms allowed after the spatial conv ("" for none; one channel, so no GroupNorm).
CBAM_NORMS = ("", "BN", "SyncBN", "FrozenBN", "nnSyncBN", "naiveSyncBN")


@CONTEXT_MODULE_REGISTRY.register()
class CBAM(nn.Module):
    """CBAM, X (N, C, H, W) -> M_s * (M_c * X), same shape.

    Args:
        channels: C.
        reduction: r of the channel MLP (MODEL.ACM.CBAM_REDUCTION; the paper: 16).
        kernel_size: the spatial conv's kernel, odd (MODEL.ACM.CBAM_KERNEL_SIZE; paper: 7).
        norm: after the spatial conv, one of :data:`CBAM_NORMS` (MODEL.ACM.CBAM_NORM;
            reference code: "BN").
    """

    NAME = "CBAM"
    PLACEMENT = "residual"
    CONFIG_KEYS = {"reduction": "CBAM_REDUCTION", "kernel_size": "CBAM_KERNEL_SIZE", "norm": "CBAM_NORM"}

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, norm: str = "BN"):
        super().__init__()
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= channels:
            raise ValueError(
                f"CBAM: MODEL.ACM.CBAM_REDUCTION must be an integer in [1, channels] = [1, {channels}], got {reduction!r}"
            )
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CBAM: MODEL.ACM.CBAM_KERNEL_SIZE must be an odd integer >= 1 (paper: 7), got {kernel_size!r}")
        if norm not in CBAM_NORMS:
            raise ValueError(f"CBAM: MODEL.ACM.CBAM_NORM must be one of {list(CBAM_NORMS)}, got {norm!r}")
        self.channels = channels
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
        )
        self.spatial = Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm, norm=get_norm(norm, 1))

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> M_c, (N, C, 1, 1)."""
        average = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        maximum = x.amax(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        return torch.sigmoid(self.channel_mlp(average) + self.channel_mlp(maximum))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> M_s, (N, 1, H, W)."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)  # (N, 2, H, W)
        return torch.sigmoid(self.spatial(pooled))

    def attention_of_position(self, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """x (N, C, H, W) -> (N, H, W): the spatial gate M_s (values in (0, 1)), the same for
        every position."""
        return self.spatial_gate(x * self.channel_gate(x))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> (N, C, H, W)."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            report_acm_call(self, x, None)  # its input, for the attention pictures (acm_d2.visualization)
        refined = x * self.channel_gate(x)  # (N, C, H, W)
        return refined * self.spatial_gate(refined)
