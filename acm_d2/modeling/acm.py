"""Attend-and-Compare Module (Kim et al., "Learning Visual Context by Comparison", ECCV 2020,
arXiv 2007.07506).

Given X of shape (N, C, H, W) and G channel groups:

* mu = the spatial mean of X, (N, C, 1, 1);
* K = sum_hw softmax_hw(W_K * (X - mu)) * (X - mu), per group: group g has its own 1x1 conv
  (C/G -> 1 channel, with bias) that gives one attention map over H*W, with which K^g pools
  the group's C/G channels; Q likewise with W_Q. K, Q: (N, C, 1, 1);
* P = sigmoid(conv2(relu(conv1(mu)))), two grouped 1x1 convs C -> C/2 -> C;
* Y = P * (X + (K - Q)), and the orthogonality term (K . Q) / C per sample.

The paper's ablation (its Table 2a) also drops parts of the module; ``variant`` selects one:

=================  ==================  ==========================================
variant            parameters          output
=================  ==================  ==========================================
"P(X+(K-Q))"       kq_logits, gate     the full module (default)
"X+(K-Q)"          kq_logits           no channel re-calibration
"P(X+K)"           kq_logits (K only)  no Q, so no orthogonality term
"PX"               gate                re-calibration only (an SE-like module)
=================  ==================  ==========================================

The computation is :func:`acm_d2.modeling.acm_function.attend_and_compare`, one fused
autograd Function for training and a fused no-grad path for inference (its docstring
derives it); :class:`acm_d2.ReferenceACM` is the literal transcription it is tested against.
"""
import logging
from typing import Optional, Tuple

import torch
from torch import nn

from ..authors_layout import convert_acm_keys
from .acm_function import attend_and_compare
from .context import CONTEXT_MODULE_REGISTRY
from .recorder import report_acm_call

__all__ = ["ACM", "ACM_INITS", "ACM_VARIANTS", "check_acm_settings"]

logger = logging.getLogger(__name__)

#: The module variants of the paper's Table 2a, by the formula of their output.
ACM_VARIANTS = ("P(X+(K-Q))", "X+(K-Q)", "P(X+K)", "PX")

#: The initialisations of an ACM (MODEL.ACM.INIT; see :meth:`ACM.reset_parameters` and
#: docs/initialisation.md).
ACM_INITS = ("authors", "identity")


def check_acm_settings(channels: int, groups: int, variant: str = "P(X+(K-Q))", where: str = "ACM") -> None:
    """Raise ValueError unless ``variant`` is known and ``groups`` >= 1 divides ``channels``
    (K and Q) and ``channels / 2`` (P). ``where`` names the place (e.g. ``"res3.0"``)."""
    if variant not in ACM_VARIANTS:
        raise ValueError(f"{where}: MODEL.ACM.VARIANT must be one of {list(ACM_VARIANTS)}, got {variant!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{where}: MODEL.ACM.GROUPS must be an integer >= 1, got {groups!r}")
    if channels % 2 != 0 or (channels // 2) % groups != 0:
        raise ValueError(
            f"{where}: ACM needs the number of groups to divide both the channel count and half "
            f"of it (the recalibration convs map C -> C/2 -> C in groups); got channels={channels}, "
            f"groups={groups} (MODEL.ACM.GROUPS). Allowed groups here: "
            f"{[g for g in range(1, channels // 2 + 1) if (channels // 2) % g == 0]}"
        )


@CONTEXT_MODULE_REGISTRY.register()
class ACM(nn.Module):
    """The Attend-and-Compare Module, a drop-in map X (N, C, H, W) -> Y (N, C, H, W).

    Args:
        channels: C, the channel count of X.
        groups: G, the number of channel groups; each has its own K and Q attention map.
            Must divide C / 2. The authors used 32.
        variant: one of :data:`ACM_VARIANTS` (see the module docstring).
        init: one of :data:`ACM_INITS`, the initialisation (MODEL.ACM.INIT): "authors"
            (default, the paper's) or "identity" (see :meth:`reset_parameters`).

    Parameters (the layout of checkpoints; :mod:`acm_d2.checkpoint` converts the authors'):
        kq_logits: grouped 1x1 conv C -> 2G without bias, the logits of the K and Q maps,
            outputs interleaved per group [K_0, Q_0, K_1, Q_1, ...] (C -> G, K only, for
            "P(X+K)"; absent for "PX"). The paper's maps have a bias, which changes nothing:
            softmax is shift-invariant. Checkpoints that hold it (the authors', and those of
            acm-d2 before version 2 of this module) load; the bias is dropped.
        channel_gate: P, grouped 1x1 convs C -> C/2 -> C with a ReLU between (the sigmoid
            is applied in forward); absent for "X+(K-Q)".

    ``forward(x)`` returns Y in x's dtype and memory format. Inside an
    :class:`acm_d2.modeling.ACMRecorder` it also reports X and the per-sample orthogonality
    term, which the meta-architecture turns into ``loss_acm_orth``.
    """

    NAME = "ACM"
    PLACEMENT = "residual"  # after the block's last conv + norm, before the shortcut add
    CONFIG_KEYS = {"groups": "GROUPS", "variant": "VARIANT", "init": "INIT"}
    # Configs of ACM size GROUPS to their backbone (16 for the synthetic R-18): other modules
    # built from them ignore it (INIT and VARIANT they refuse, see check_unread_settings).
    IGNORABLE_KEYS = ("GROUPS",)

    def __init__(self, channels: int, groups: int = 32, variant: str = "P(X+(K-Q))", init: str = "authors"):
        super().__init__()
        check_acm_settings(channels, groups, variant)
        if init not in ACM_INITS:
            raise ValueError(f"ACM: MODEL.ACM.INIT must be one of {list(ACM_INITS)}, got {init!r}")
        self.channels = channels
        self.groups = groups
        self.variant = variant
        self.init = init
        maps_per_group = {"P(X+(K-Q))": 2, "X+(K-Q)": 2, "P(X+K)": 1, "PX": 0}[variant]
        self.kq_logits: Optional[nn.Conv2d] = None
        self.channel_gate: Optional[nn.Sequential] = None
        if maps_per_group:
            self.kq_logits = nn.Conv2d(channels, maps_per_group * groups, 1, groups=groups, bias=False)
        if variant.startswith("P"):
            self.channel_gate = nn.Sequential(
                nn.Conv2d(channels, channels // 2, 1, groups=groups, bias=True),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels // 2, channels, 1, groups=groups, bias=True),
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the parameters as ``self.init`` says.

        "authors": Kaiming-normal (fan_out, relu) weights and zero biases, as the authors did.

        "identity": the authors' init, then the K and Q map weights and the last gate conv
        (weight and bias) set to zero. At this point, for every input X:

        * W_K = W_Q = 0: every map is uniform, K = Q = 0 exactly, so K - Q = 0, and so is its
          Jacobian with respect to X (the two maps' terms cancel exactly);
        * P = sigmoid(0) = 1/2 exactly, the same for every sample and channel;
        * so Y = X / 2 exactly (Y = X for "X+(K-Q)", which has no P), and the backward pass
          is dX = dY / 2 (up to float rounding: the fused backward adds the K and Q terms,
          which cancel).

        The halving is undone outside the module, where a network without ACM is loaded:
        :attr:`identity_input_scale` (2 here) multiplies the affine output of the layer that
        feeds the module (the block's last norm), which is exact in floating point, so that
        the block computes bit for bit what the plain block computed. Every parameter still
        learns: at step 0 the map weights get non-zero gradients (for uniform maps,
        dL/dW_K = Cov_hw(X) dL/dK per group; dL/dW_Q is its negative, so K and Q move apart),
        and so do the last gate conv's weight and bias; the first gate conv's gradient passes
        through the zero weight, so it is zero at step 0 and non-zero from step 1 on (as for
        the zero-initialised last layers of GC, NL and CC).
        """
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        if self.init == "identity":
            if self.kq_logits is not None:
                nn.init.zeros_(self.kq_logits.weight)
            if self.channel_gate is not None:
                nn.init.zeros_(self.channel_gate[2].weight)
                nn.init.zeros_(self.channel_gate[2].bias)

    @property
    def identity_input_scale(self) -> float:
        """The factor by which the input of an "identity"-initialised module must be scaled
        for the module to be the identity at initialisation: 1 / P = 2 for the variants with
        P, 1 for "X+(K-Q)" and for the "authors" init (nothing to undo)."""
        return 2.0 if self.init == "identity" and self.channel_gate is not None else 1.0

    # Version 2: kq_logits has no bias (version 1 kept one that softmax ignores).
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Convert the older layouts found under ``prefix`` before loading: the authors'
        standalone module (``add_mod.*``, ``sub_mod.*``, ``mul_mod.*``) and the bias of
        ``kq_logits`` (see :func:`acm_d2.authors_layout.convert_acm_keys`)."""
        convert_acm_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, variant={self.variant!r}, init={self.init!r}"

    def forward_with_orthogonality(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (N, C, H, W) -> (Y (N, C, H, W), orthogonality (N,) or None), like the authors'
        module returns ``(Y, dp)``. The term is float32 (float64 for float64 x); None for the
        variants without K or Q."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ACM built for {self.channels} channels got an input of shape {list(x.shape)}")
        kq_weight: Optional[torch.Tensor] = None
        if self.kq_logits is not None:
            kq_weight = self.kq_logits.weight
        gate1_weight: Optional[torch.Tensor] = None
        gate1_bias: Optional[torch.Tensor] = None
        gate2_weight: Optional[torch.Tensor] = None
        gate2_bias: Optional[torch.Tensor] = None
        if self.channel_gate is not None:
            gate1_weight, gate1_bias = self.channel_gate[0].weight, self.channel_gate[0].bias
            gate2_weight, gate2_bias = self.channel_gate[2].weight, self.channel_gate[2].bias
        return attend_and_compare(
            x, kq_weight, gate1_weight, gate1_bias, gate2_weight, gate2_bias, self.groups, self.variant
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> Y (N, C, H, W)."""
        y, orthogonality = self.forward_with_orthogonality(x)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._report(x, orthogonality)
        return y

    @torch.jit.unused
    def _report(self, x: torch.Tensor, orthogonality: Optional[torch.Tensor]) -> None:
        report_acm_call(self, x, orthogonality)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits of the attention maps, (N, G, M, H*W) in float32 (float64
        for float64 x), M = 2 maps (K, Q) per group, or 1 (K) for "P(X+K)"."""
        if self.kq_logits is None:
            raise ValueError(f"ACM variant {self.variant!r} has no attention maps")
        n, _, h, w = x.shape
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = nn.functional.conv2d(x.to(wide), self.kq_logits.weight.to(wide), None, groups=self.groups)
        return logits.view(n, self.groups, -1, h * w)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> the softmax maps (N, G, M, H, W) (see :meth:`attention_logits`);
        each sums to 1 over H, W."""
        n, _, h, w = x.shape
        maps = torch.softmax(self.attention_logits(x), dim=-1)
        return maps.view(n, self.groups, -1, h, w)
