"""Non-local block, embedded-Gaussian form (Wang, Girshick, Gupta, He, "Non-local Neural
Networks", CVPR 2018, arXiv 1711.07971), a peer of ACM in the ACM paper's Table 6.

For X of shape (N, C, H, W), with inner width C' = C / reduction (the paper: C / 2):

* theta = W_theta X, phi = W_phi X, g = W_g X: 1x1 convs C -> C', flattened to (N, C', HW);
* f(i, j) = softmax_j(theta_i . phi_j / sqrt(C')): every position i attends to every j
  (the embedded Gaussian, with the scaled dot product of the reference implementations);
* y_i = sum_j f(i, j) g_j, (N, C', H, W);
* Z = X + W_z y, W_z a 1x1 conv C' -> C (optionally followed by a norm).

W_z starts at zero (its conv, or its norm's gamma when there is a norm), so the block is
the identity at initialisation and a pretrained network keeps its function (the paper's
"initialized as zeros"). theta, phi and g start from N(0, 0.01^2) weights with zero bias.

Placement (the paper's Mask R-CNN setting, section 6): one block after a whole ResNet block,
right before the last residual block of res4 (``MODEL.ACM.AFTER_BLOCKS``). Memory: the map f
has (HW)^2 entries per image, kept in float32.

Precision: the energies, the softmax and the weighted sum run in float32 (float64 for
float64 X) with autocast turned off in eager mode; TorchScript takes no autocast of a
variable device, so the scripted module casts to float32 and leaves autocast as it is.
"""
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .context import CONTEXT_MODULE_REGISTRY
from .recorder import report_acm_call

__all__ = ["NonLocalBlock"]

#: Norms allowed after W_z ("" for none; a frozen norm would keep its zero gamma).
NL_NORMS = ("", "BN", "SyncBN", "GN", "nnSyncBN", "naiveSyncBN")


@CONTEXT_MODULE_REGISTRY.register()
class NonLocalBlock(nn.Module):
    """The embedded-Gaussian non-local block, X (N, C, H, W) -> X + W_z y, same shape.

    Args:
        channels: C.
        reduction: C / C', the inner width ratio (MODEL.ACM.NL_REDUCTION; the paper: 2).
        norm: a Detectron2 norm name after W_z, one of :data:`NL_NORMS` (MODEL.ACM.NL_NORM;
            "" for a plain conv with bias, as in Detectron2's frozen-BN backbones).
    """

    NAME = "NL"
    PLACEMENT = "after_block"
    CONFIG_KEYS = {"reduction": "NL_REDUCTION", "norm": "NL_NORM"}

    def __init__(self, channels: int, reduction: int = 2, norm: str = ""):
        super().__init__()
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= channels:
            raise ValueError(
                f"NL: MODEL.ACM.NL_REDUCTION must be an integer in [1, channels] = [1, {channels}], got {reduction!r}"
            )
        if norm not in NL_NORMS:
            raise ValueError(f"NL: MODEL.ACM.NL_NORM must be one of {list(NL_NORMS)}, got {norm!r}")
        self.channels = channels
        self.inner_channels = channels // reduction
        self.theta = nn.Conv2d(channels, self.inner_channels, 1)
        self.phi = nn.Conv2d(channels, self.inner_channels, 1)
        self.g = nn.Conv2d(channels, self.inner_channels, 1)
        self.out = Conv2d(self.inner_channels, channels, 1, bias=not norm, norm=get_norm(norm, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """theta, phi, g: N(0, 0.01^2) weights, zero bias; W_z: zero (conv, or norm gamma)."""
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        if self.out.norm is None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        else:
            nn.init.normal_(self.out.weight, std=0.01)
            nn.init.zeros_(self.out.norm.weight)
            nn.init.zeros_(self.out.norm.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> f, (N, HW, HW) float32 (float64 for float64 x): row i is the
        softmax over positions j that position i (row-major, i = h * W + w) attends to."""
        theta = self.theta(x).flatten(2)  # (N, C', HW)
        phi = self.phi(x).flatten(2)  # (N, C', HW)
        if torch.jit.is_scripting():  # TorchScript takes no autocast of a variable device
            return self._softmax_of_energies(theta, phi)
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under autocast
            return self._softmax_of_energies(theta, phi)

    def _softmax_of_energies(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """theta, phi (N, C', HW) -> softmax_j(theta_i . phi_j / sqrt(C')), (N, HW, HW) in
        float32 (float64 for float64 inputs)."""
        wide = torch.float64 if theta.dtype == torch.float64 else torch.float32
        energy = torch.bmm(theta.to(wide).transpose(1, 2), phi.to(wide))  # (N, HW, HW)
        return torch.softmax(energy * self.inner_channels ** -0.5, dim=-1)

    def _gather(self, g: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """g (N, C', HW), f (N, HW, HW) -> y_i = sum_j f(i, j) g_j, (N, C', HW) in f's dtype."""
        return torch.bmm(g.to(attention.dtype), attention.transpose(1, 2))

    def attention_of_position(self, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """x (N, C, H, W) -> (N, H, W): the weights f(u, .) with which the position u = (row,
        col) gathers g; they sum to 1."""
        n, _, h, w = x.shape
        return self.attention(x)[:, row * w + col].view(n, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> X + W_z y, (N, C, H, W)."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            report_acm_call(self, x, None)  # its input, for the attention pictures (acm_d2.visualization)
        n, _, h, w = x.shape
        attention = self.attention(x)  # (N, HW, HW)
        g = self.g(x).flatten(2)  # (N, C', HW)
        if torch.jit.is_scripting():
            y = self._gather(g, attention)  # (N, C', HW)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = self._gather(g, attention)
        y = y.to(x.dtype).view(n, self.inner_channels, h, w)
        return x + self.out(y)
