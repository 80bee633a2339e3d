"""Squeeze-and-Excitation (Hu et al., CVPR 2018, arXiv 1709.01507), the ACM paper's simplest peer.

Used to compare ACM against a plain backbone and against SE placed the same way.
"""
import torch
from torch import nn


__all__ = ["SqueezeExcitation"]


class SqueezeExcitation(nn.Module):
    """Y = X * sigmoid(fc2(relu(fc1(mean_hw X)))), the fcs as 1x1 convs with bias."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if reduction < 1 or channels // reduction < 1:
            raise ValueError(
                f"SqueezeExcitation: reduction must be in [1, channels]; got channels={channels}, "
                f"reduction={reduction}"
            )
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate  # (N, C, 1, 1) broadcast over (H, W)
