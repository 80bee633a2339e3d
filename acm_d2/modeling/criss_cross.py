"""Recurrent criss-cross attention (Huang, Wang, Huang, Huang, Wei, Liu, "CCNet: Criss-Cross
Attention for Semantic Segmentation", ICCV 2019, arXiv 1811.11721), a peer of ACM in the ACM
paper's Table 6. Pure PyTorch (no CUDA extension).

One criss-cross attention on X of shape (N, C, H, W):

* Q = W_Q X, K = W_K X (1x1 convs C -> C / 8), V = W_V X (1x1 conv C -> C);
* for the pixel u = (i, j), the energies d(u, v) = Q_u . K_v over the H + W - 1 positions v
  of its row i and its column j, the pixel itself counted once;
* A(u, .) = softmax over those H + W - 1 positions;
* H'_u = gamma * sum_v A(u, v) V_v + X_u, with the learnable scalar gamma starting at 0.

The recurrent module applies it R times with the same weights (R = 2 in the paper: every
pixel then sees every other), so X -> CCA(CCA(X)). Since gamma starts at 0 the module is the
identity at initialisation. Convolutions keep PyTorch's default initialisation.

Placement (CCNet's COCO experiments, following the non-local paper): one unit after a whole
ResNet block, right before the last residual block of res4 (``MODEL.ACM.AFTER_BLOCKS``).
Memory: A has H * W * (H + W) entries per image, kept in float32.

Precision: the energies, the softmax and the weighted sum run in float32 (float64 for
float64 X) with autocast turned off in eager mode; TorchScript takes no autocast of a
variable device, so the scripted module casts to float32 and leaves autocast as it is.
"""
import torch
from torch import nn

from .context import CONTEXT_MODULE_REGISTRY
from .recorder import report_acm_call

__all__ = ["CrissCrossAttention"]


@CONTEXT_MODULE_REGISTRY.register()
class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention, X (N, C, H, W) -> (N, C, H, W).

    Args:
        channels: C.
        reduction: C / C_QK, the width ratio of Q and K (MODEL.ACM.CC_REDUCTION; paper: 8).
        recurrence: R, how many times the attention is applied, with shared weights
            (MODEL.ACM.CC_RECURRENCE; paper: 2).
    """

    NAME = "CC"
    PLACEMENT = "after_block"
    CONFIG_KEYS = {"reduction": "CC_REDUCTION", "recurrence": "CC_RECURRENCE"}

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2):
        super().__init__()
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= channels:
            raise ValueError(
                f"CC: MODEL.ACM.CC_REDUCTION must be an integer in [1, channels] = [1, {channels}], got {reduction!r}"
            )
        if isinstance(recurrence, bool) or not isinstance(recurrence, int) or recurrence < 1:
            raise ValueError(f"CC: MODEL.ACM.CC_RECURRENCE must be an integer >= 1 (paper: 2), got {recurrence!r}")
        self.channels = channels
        self.recurrence = recurrence
        self.query = nn.Conv2d(channels, channels // reduction, 1)
        self.key = nn.Conv2d(channels, channels // reduction, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> A, (N, H, W, H + W) float32 (float64 for float64 x): for the
        pixel (i, j), entries [0, H) are its column (k, j) (zero at k = i, the pixel being
        counted in its row) and entries [H, H + W) its row (i, k); they sum to 1."""
        query = self.query(x)  # (N, C', H, W)
        key = self.key(x)  # (N, C', H, W)
        if torch.jit.is_scripting():  # TorchScript takes no autocast of a variable device
            return self._softmax_of_energies(query, key)
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under autocast
            return self._softmax_of_energies(query, key)

    @staticmethod
    def _softmax_of_energies(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Q, K (N, C', H, W) -> A of :meth:`attention`, in float32 (float64 for float64 Q)."""
        wide = torch.float64 if query.dtype == torch.float64 else torch.float32
        query, key = query.to(wide), key.to(wide)
        h = query.shape[2]
        column = torch.einsum("ncij,nckj->nijk", query, key)  # (N, H, W, H): pixel (i, j) and (k, j)
        index = torch.arange(h, device=query.device)
        itself = index.view(h, 1, 1) == index.view(1, 1, h)  # (H, 1, H): k == i (no eye: ONNX Runtime lacks EyeLike)
        column = column.masked_fill(itself, float("-inf"))
        row = torch.einsum("ncij,ncik->nijk", query, key)  # (N, H, W, W): pixel (i, j) and (i, k)
        return torch.softmax(torch.cat([column, row], dim=-1), dim=-1)

    def attention_of_position(self, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """x (N, C, H, W) -> (N, H, W): the weights of the first criss-cross pass with which the
        pixel (row, col) gathers V, on its row and column (zero elsewhere); they sum to 1."""
        h, w = x.shape[2:]
        attention = self.attention(x)[:, row, col]  # (N, H + W)
        maps = attention.new_zeros(x.shape[0], h, w)
        maps[:, :, col] = attention[:, :h]
        maps[:, row, :] += attention[:, h:]
        return maps

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross attention: x (N, C, H, W) -> gamma * sum_v A V_v + x."""
        h, w = x.shape[2:]
        attention = self.attention(x)  # (N, H, W, H + W)
        value = self.value(x)  # (N, C, H, W)
        if torch.jit.is_scripting():
            gathered = self._gather(attention, value, h, w)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                gathered = self._gather(attention, value, h, w)
        return self.gamma.to(x.dtype) * gathered.to(x.dtype) + x

    @staticmethod
    def _gather(attention: torch.Tensor, value: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """A (N, H, W, H + W), V (N, C, H, W) -> sum_v A(u, v) V_v, (N, C, H, W) in A's dtype."""
        value = value.to(attention.dtype)
        column, row = attention.split([h, w], dim=-1)
        return torch.einsum("nijk,nckj->ncij", column, value) + torch.einsum("nijk,ncik->ncij", row, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> the attention applied ``recurrence`` times, (N, C, H, W)."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            report_acm_call(self, x, None)  # its input, for the attention pictures (acm_d2.visualization)
        for _ in range(self.recurrence):
            x = self.attend(x)
        return x
