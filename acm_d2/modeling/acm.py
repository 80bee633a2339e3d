"""Attend-and-Compare Module (Kim et al., "Learning Visual Context by Comparison", ECCV 2020,
arXiv 2007.07506).

Given X of shape (N, C, H, W), split into G channel groups:

* K = sum_hw softmax_hw(W_K * (X - mu)) * (X - mu) and Q likewise with W_Q, per group;
* P = sigmoid(conv2(relu(conv1(mu)))) with mu the spatial mean of X;
* Y = P * (X + (K - Q)), and the orthogonality term (K . Q) / C per sample.

The implementation uses exact identities (see ``shared/ACM_SPEC.md``): softmax is
shift-invariant, so the attention maps are computed from X instead of X - mu; and the maps
sum to one, so K - Q pools X directly and mu only enters the orthogonality term. The
computation is one autograd Function (:mod:`acm_d2.modeling.acm_function`): in forward, two
reads of X for all reductions (the K and Q logits in one product; K, Q and mu pooled in one
product) and one fused multiply-add for Y; for backward it saves only X and small vectors.
Passes and measurements: docs/benchmark.md.
"""
import logging

import torch
from torch import nn

from .acm_function import ACMFunction, acm_attention_logits, acm_forward
from .context_module import ResidualContextModule

__all__ = ["ACM", "check_acm_channels"]

logger = logging.getLogger(__name__)


def check_acm_channels(channels: int, groups: int, where: str = "ACM") -> None:
    """Raise ValueError unless ``groups`` >= 1 divides ``channels`` and ``channels / 2``.

    ``where`` names the place (e.g. ``"res3.0"``) in the message.
    """
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{where}: MODEL.ACM.GROUPS must be an integer >= 1, got {groups!r}")
    if channels % 2 != 0 or (channels // 2) % groups != 0:
        raise ValueError(
            f"{where}: ACM needs the number of groups to divide both the channel count and half "
            f"of it (the recalibration convs map C -> C/2 -> C in groups); got channels={channels}, "
            f"groups={groups} (MODEL.ACM.GROUPS). Allowed groups here: "
            f"{[g for g in range(1, channels // 2 + 1) if (channels // 2) % g == 0]}"
        )


class ACM(ResidualContextModule):
    """The Attend-and-Compare Module.

    Args:
        channels: C, the channel count of X.
        groups: G, the number of channel groups; each group has its own K and Q attention map.
            Must divide C / 2.

    ``forward(x)`` maps X (N, C, H, W) to Y (N, C, H, W) in X's dtype. When
    ``record_orthogonality`` is True (set by :func:`acm_d2.attach_acm_orth_loss`), each
    training forward also stores ``last_orthogonality``: the per-sample (K . Q) / C with
    mean-subtracted K and Q, shape (N,), float32 (float64 for float64 X), part of the
    autograd graph.
    """

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        check_acm_channels(channels, groups)
        self.channels = channels
        self.groups = groups
        # Logits of the K and Q attention maps; output channels are interleaved per group:
        # [K_0, Q_0, K_1, Q_1, ...], each from its group's C/G input channels.
        self.kq_logits = nn.Conv2d(channels, 2 * groups, 1, groups=groups, bias=True)
        # P of the paper: C -> C/2 -> C grouped 1x1 convs on the spatial mean, then sigmoid.
        self.channel_gate = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1, groups=groups, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, 1, groups=groups, bias=True),
        )
        self.record_orthogonality = False
        self.last_orthogonality = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) weights and zero biases, as the authors did."""
        for conv in (self.kq_logits, self.channel_gate[0], self.channel_gate[2]):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"

    def _weights(self):
        return (
            self.kq_logits.weight,
            self.kq_logits.bias,
            self.channel_gate[0].weight,
            self.channel_gate[0].bias,
            self.channel_gate[2].weight,
            self.channel_gate[2].bias,
        )

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> logits of the K and Q maps, (N, G, 2, H*W), float32 (float64 for
        float64 x)."""
        n, _, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = acm_attention_logits(x, self.kq_logits.weight, self.kq_logits.bias, self.groups)
        return logits.view(n, self.groups, 2, h * w)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> the K and Q softmax maps, (N, G, 2, H, W); each sums to 1."""
        n, _, h, w = x.shape
        maps = torch.softmax(self.attention_logits(x), dim=-1)  # (N, G, 2, HW)
        return maps.view(n, self.groups, 2, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ACM built for {self.channels} channels got an input of shape {tuple(x.shape)}")
        weights = self._weights()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in weights))
        if needs_grad and not torch.jit.is_tracing():
            # One autograd Function: saves only X (and small vectors) for backward. A tracer
            # (TracingAdapter, FlopCountAnalysis) gets the same computation as plain ops instead,
            # which it can record and count.
            y, orthogonality = ACMFunction.apply(x, *weights, self.groups)
        else:
            y, orthogonality = acm_forward(x, *weights, self.groups)
        if self.training and self.record_orthogonality:
            self.last_orthogonality = orthogonality  # (N,), float32 (float64 for float64 X)
        return y
