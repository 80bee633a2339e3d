"""Squeeze-and-Excitation (Hu, Shen, Sun, CVPR 2018, arXiv 1709.01507), the ACM paper's simplest peer.

Placed as its paper places it in a ResNet: on the residual branch of every block, after the
last conv + norm and before the shortcut add.
"""
import torch
from torch import nn

from .context import CONTEXT_MODULE_REGISTRY

__all__ = ["SqueezeExcitation"]


@CONTEXT_MODULE_REGISTRY.register()
class SqueezeExcitation(nn.Module):
    """Y = X * sigmoid(fc2(relu(fc1(mean_hw X)))), the fcs as 1x1 convs with bias.

    Args:
        channels: C.
        reduction: r, the hidden width is C / r (MODEL.ACM.SE_REDUCTION; the paper: 16).
    Initialisation: PyTorch's default for the two convs (as the reference code).
    """

    NAME = "SE"
    PLACEMENT = "residual"
    CONFIG_KEYS = {"reduction": "SE_REDUCTION"}

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= channels:
            raise ValueError(
                f"SE: MODEL.ACM.SE_REDUCTION must be an integer in [1, channels] = [1, {channels}], got {reduction!r}"
            )
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))  # (N, C, 1, 1)
        return x * gate
