"""A literal transcription of the Attend-and-Compare Module's equations (arXiv 2007.07506).

This module is the yardstick for :class:`acm_d2.ACM`: it computes every quantity of the
paper the obvious way (a mean-subtracted copy of X, two separate attend modules, each with
its own conv, softmax and pooling, then ``P * (X + K - Q)``). It is kept in the package for
the tests, the benchmark and the checkpoint converter, and its parameters are laid out
like the authors' implementation (``add_mod`` is K, ``sub_mod`` is Q, ``mul_mod`` is P),
so a state dict of one of the authors' modules loads into it unchanged.
"""
import torch
from torch import nn

__all__ = ["ReferenceACM"]


class _AttendModule(nn.Module):
    """Pools X with one softmax attention map per channel group (K or Q of the paper)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.map_gen = nn.Sequential(nn.Conv2d(channels, groups, 1, groups=groups, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> pooled (N, C, 1, 1)."""
        n, c, h, w = x.shape
        logits = self.map_gen(x).view(n, self.groups, 1, h * w)  # (N, G, 1, HW)
        wide = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 X
        attention = torch.softmax(logits.to(wide), dim=-1)  # (N, G, 1, HW)
        grouped = x.view(n, self.groups, c // self.groups, h * w).to(wide)  # (N, G, C/G, HW)
        pooled = torch.matmul(grouped, attention.transpose(-1, -2))  # (N, G, C/G, 1)
        return pooled.view(n, c, 1, 1)


class _ModulateModule(nn.Module):
    """The channel re-calibration P of the paper, computed from the spatial mean."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.feature_gen = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1, groups=groups, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, 1, groups=groups, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        """mu: (N, C, 1, 1) -> P: (N, C, 1, 1)."""
        return self.feature_gen(mu)


class ReferenceACM(nn.Module):
    """Literal ACM: Y = P * (X + (K - Q)) and the orthogonality term (K . Q) / C, or one of
    the ablated variants of the paper's Table 2a (``variant``):

    * ``"P(X+(K-Q))"``: the full module (K = ``add_mod``, Q = ``sub_mod``, P = ``mul_mod``);
    * ``"X+(K-Q)"``: no P (no ``mul_mod``);
    * ``"P(X+K)"``: no Q (no ``sub_mod``);
    * ``"PX"``: no K and no Q (only ``mul_mod``).

    ``forward(x)`` takes X of shape (N, C, H, W) and returns ``(Y, orthogonality)`` with Y
    of shape (N, C, H, W) and orthogonality of shape (N,) (float32; float64 for float64 X),
    like the authors' module returns ``(Y, dp)``; orthogonality is None for the variants
    without K or Q.
    """

    def __init__(self, channels: int, groups: int = 32, variant: str = "P(X+(K-Q))"):
        super().__init__()
        if variant not in ("P(X+(K-Q))", "X+(K-Q)", "PX", "P(X+K)"):
            raise ValueError(f"unknown ACM variant {variant!r}")
        self.channels = channels
        self.groups = groups
        self.variant = variant
        self.add_mod = _AttendModule(channels, groups) if variant != "PX" else None
        self.sub_mod = _AttendModule(channels, groups) if "Q" in variant else None
        self.mul_mod = _ModulateModule(channels, groups) if variant.startswith("P") else None

    def forward(self, x: torch.Tensor):
        wide = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 X
        mu = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        x_centered = x - mu  # (N, C, H, W)
        out = x.to(wide)
        k = q = orthogonality = None
        if self.add_mod is not None:
            k = self.add_mod(x_centered)  # (N, C, 1, 1)
            out = out + k
        if self.sub_mod is not None:
            q = self.sub_mod(x_centered)  # (N, C, 1, 1)
            out = out - q
            orthogonality = (k * q).sum(dim=(1, 2, 3)) / self.channels  # (N,)
        if self.mul_mod is not None:
            out = out * self.mul_mod(mu.to(wide))  # P: (N, C, 1, 1)
        return out.to(x.dtype), orthogonality
