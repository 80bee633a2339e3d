"""Global context block (Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV 2019 workshops, arXiv 1904.11492), a context
module the ACM paper compares itself with in its related work.

For X of shape (N, C, H, W), with the bottleneck width C' = ratio * C (the paper: 1/4 or 1/16):

* context modelling, attention pooling ("att"): a = softmax_hw(W_k X), one 1x1 conv C -> 1;
  c = sum_hw a * X, (N, C, 1, 1);
* transform: t = W_v2 ReLU(LayerNorm(W_v1 c)), 1x1 convs C -> C' -> C, LayerNorm over
  (C', 1, 1);
* fusion "channel_add": Z = X + t, t broadcast over H, W.

W_v2 (the last conv) starts at zero, so the block is the identity at initialisation; W_k
starts Kaiming-normal (fan_in) with zero bias; W_v1 keeps PyTorch's default.

Placement (the paper's Mask R-CNN setting): on the residual branch of every block of the
trained stages (res3-res5), after the last conv + norm and before the shortcut add.
"""
import torch
from torch import nn

from .context import CONTEXT_MODULE_REGISTRY
from .recorder import report_acm_call

__all__ = ["GlobalContextBlock"]


@CONTEXT_MODULE_REGISTRY.register()
class GlobalContextBlock(nn.Module):
    """The global context block with attention pooling and channel-add fusion,
    X (N, C, H, W) -> X + transform(context), same shape.

    Args:
        channels: C.
        ratio: C' / C, the bottleneck ratio of the transform (MODEL.ACM.GC_RATIO; the paper's
            COCO models: 1/4 and 1/16), in (0, 1] with C' = int(ratio * C) >= 1.
    """

    NAME = "GC"
    PLACEMENT = "residual"
    CONFIG_KEYS = {"ratio": "GC_RATIO"}

    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1 or int(ratio * channels) < 1:
            raise ValueError(
                f"GC: MODEL.ACM.GC_RATIO must be a number in (0, 1] with ratio * channels >= 1 (channels={channels}; "
                f"the paper: 0.25 or 0.0625), got {ratio!r}"
            )
        self.channels = channels
        planes = int(ratio * channels)
        self.attention_logits = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, planes, 1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, 1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_k: Kaiming normal (fan_in), zero bias; the last conv: zero weight and bias."""
        nn.init.kaiming_normal_(self.attention_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.attention_logits.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> a, (N, 1, H, W) float32 (float64 for float64 x), summing to 1."""
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, _, h, w = x.shape
        logits = self.attention_logits(x).view(n, 1, h * w)  # (N, 1, HW)
        return torch.softmax(logits.to(wide), dim=-1).view(n, 1, h, w)

    def attention_of_position(self, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """x (N, C, H, W) -> (N, H, W): the pooling weights a, the same for every position."""
        return self.attention(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> X + t, (N, C, H, W)."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            report_acm_call(self, x, None)  # its input, for the attention pictures (acm_d2.visualization)
        n, c, h, w = x.shape
        weights = self.attention(x).view(n, h * w, 1).to(x.dtype)  # (N, HW, 1)
        context = torch.bmm(x.reshape(n, c, h * w), weights).view(n, c, 1, 1)  # (N, C, 1, 1)
        return x + self.transform(context)
