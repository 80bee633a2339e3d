"""The Attend-and-Compare Module as one function, near the memory-traffic floor.

ACM costs few FLOPs but touches the whole feature map X (N, C, H, W): its cost is the number
of passes over X (and, on a CPU, the number of fresh X-sized tensors, since writing newly
allocated memory is several times dearer than reading it). :func:`attend_and_compare`
computes every variant of the module of :mod:`acm_d2.modeling.acm` (the paper's Table 2a)
with M attention maps per group (M = 2: K and Q; M = 1: K; M = 0: none) and three exact
identities:

* softmax is shift-invariant, so the maps of X and of X - mu are the same, and the logits'
  bias (constant over positions) changes nothing: its gradient is exactly zero;
* the maps sum to one, so K - Q = (A_K - A_Q) X and K = A_K X - mu: no X - mu tensor;
* mu is X pooled with the uniform map, so it comes with K and Q from the same product.

Forward, 2 reads of X for the reductions and 1 read + 1 write for Y:
  1. the logits [W_1 .. W_M; 0] @ X_g of every group (read X); E = exp(L - max L) in place
     on (N*G, M+1, HW) (no softmax: the sums S divide the pooled vectors instead), and
     E_1 - (S_1 / S_2) E_2 in place of E_1;
  2. that @ X_g^T / S gives A_1 X - A_2 X (d = K - Q, or K - mu), exactly 0 where the two
     maps are equal (the "identity" init) whatever order the product kernel sums in, the
     other raw pooled vectors (A_1 X = d + A_2 X) and mu (read X);
  3. Y = P * X + P * d with d = K - Q, K - mu or 0 (one fused multiply-add: read X, write Y);
     Y = X + d without P.
"PX" reads X once for mu (no maps).

Backward, 3 reads of X, 2 or 3 of grad Y, grad X written by one fused pass plus one product:
  1. sum over HW of grad Y and (with P) <grad Y, X> per channel give every small gradient;
  2. [W; dR] @ X_g (dR: the gradients of the raw pooled vectors) recomputes the logits (with
     the saved log-sum-exp: the maps, without a softmax) with dA, the gradient of the maps
     (read X); dL = A * (dA - sum A dA) on the small tensor;
  3. grad W = dL @ X_g^T (read X);
  4. grad X = P * grad Y + dmu / HW (one fused pass), plus [dR, W^T] @ [A; dL] (one product).

Saved for backward: X itself (an input, no copy) and vectors of size N*C or N*G*M; nothing
of the size of X or of the maps.

Memory formats: Y and grad X are in X's memory format. For contiguous X the products are
batched matrix products on the (N*G, C/G, HW) view. For channels_last X (memory (N, HW, C))
the logits are a grouped 1x1 convolution (oneDNN / cuDNN read channels_last natively) and
the poolings are batched products over tiles of about 1 MiB of X (a strided product over
all of X would re-read it once per group): no copy of X in either layout.

Precision: low-precision X (autocast) keeps X, Y, grad X and the logits product in X's
dtype (like the authors' convs under autocast); the poolings widen X to float32 (a transient
copy, tile by tile for channels_last), and the softmax, the pooled vectors, P and every
reduction are float32 (float64 for float64 X).

``torch.jit.script`` compiles the fused forward itself (``_forward``, annotated for it), and
``torch.jit.trace`` (so Detectron2's tracing and ONNX export) records it for contiguous X,
out of place where autograd needs it: scripted, traced and eager inference outputs are
equal. Under ``torch.export`` and ``torch.compile``, and when tracing channels_last X (whose
tiling loops would be unrolled for the traced size), the same equations run as plain
differentiable PyTorch ops (:func:`attend_and_compare_ops`), which compute the same numbers
up to float rounding (about 1e-6 relative per module in float32).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACMFunction", "VARIANTS", "attend_and_compare", "attend_and_compare_ops", "maps_per_group"]

#: The variants of the paper's Table 2a, by the formula of their output.
VARIANTS = ("P(X+(K-Q))", "X+(K-Q)", "PX", "P(X+K)")



def _tile_bytes() -> int:
    """channels_last poolings: rows of X per product, about 1 MiB of X (a function, which
    TorchScript compiles, where it cannot read a global)."""
    return 1 << 20


_TILE_BYTES = _tile_bytes()


def maps_per_group(variant: str) -> int:
    """M, the attention maps per group: 2 (K, Q), 1 (K only) or 0; ValueError if unknown."""
    if variant == "P(X+(K-Q))" or variant == "X+(K-Q)":
        return 2
    if variant == "P(X+K)":
        return 1
    if variant == "PX":
        return 0
    raise ValueError("unknown ACM variant '" + variant + "'; expected P(X+(K-Q)), X+(K-Q), PX or P(X+K)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and lower precisions, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.jit.unused
def _check_arguments(x: Tensor, kq_weight: Optional[Tensor], gate1_weight: Optional[Tensor], groups: int, variant: str) -> None:
    m = maps_per_group(variant)
    if x.dim() != 4:
        raise ValueError(f"attend_and_compare: x must be (N, C, H, W), got shape {list(x.shape)}")
    c = x.shape[1]
    if groups < 1 or c % groups != 0:
        raise ValueError(f"attend_and_compare: groups={groups} must divide the {c} channels of x")
    if m == 0:
        if kq_weight is not None:
            raise ValueError(f"attend_and_compare: variant {variant!r} takes no kq_weight")
    elif kq_weight is None or list(kq_weight.shape) != [m * groups, c // groups, 1, 1]:
        shape = None if kq_weight is None else list(kq_weight.shape)
        raise ValueError(
            f"attend_and_compare: variant {variant!r} needs kq_weight of shape {[m * groups, c // groups, 1, 1]}, got {shape}"
        )
    if (gate1_weight is None) != (variant == "X+(K-Q)"):
        raise ValueError(f"attend_and_compare: variant {variant!r} {'takes no' if variant == 'X+(K-Q)' else 'needs'} gate weights")


def attend_and_compare(
    x: Tensor,
    kq_weight: Optional[Tensor],
    gate1_weight: Optional[Tensor],
    gate1_bias: Optional[Tensor],
    gate2_weight: Optional[Tensor],
    gate2_bias: Optional[Tensor],
    groups: int,
    variant: str,
) -> Tuple[Tensor, Optional[Tensor]]:
    """ACM of one variant: returns (Y, orthogonality).

    Args:
        x: X, (N, C, H, W), any float dtype, contiguous or channels_last.
        kq_weight: logits of the attention maps, a grouped 1x1 conv weight without bias:
            (2G, C/G, 1, 1) with outputs interleaved [K_0, Q_0, K_1, Q_1, ...] for
            "P(X+(K-Q))" and "X+(K-Q)"; (G, C/G, 1, 1) (K) for "P(X+K)"; None for "PX".
        gate1_weight, gate1_bias, gate2_weight, gate2_bias: P's grouped 1x1 convs,
            (C/2, C/G, 1, 1), (C/2,), (C, C/2G, 1, 1), (C,); all None for "X+(K-Q)".
        groups: G.
        variant: one of :data:`VARIANTS`.

    Returns:
        Y (N, C, H, W) in x's dtype and memory format, and the orthogonality term (N,),
        (K . Q) / C with mean-subtracted K and Q, in float32 (float64 for float64 x), or None
        for the variants without K or Q.

    The fused autograd Function :class:`ACMFunction` runs when a gradient is needed, the fused
    forward otherwise (also under ``torch.jit.script``, and ``torch.jit.trace`` for contiguous
    X), and :func:`attend_and_compare_ops` under ``torch.export`` and ``torch.compile``.
    """
    if torch.jit.is_scripting():  # the fused no-grad path, compiled
        y, orthogonality, _ = _forward(x, kq_weight, gate1_weight, gate1_bias, gate2_weight, gate2_bias, groups, variant,
                                       False)
        return y, orthogonality
    return _dispatch(x, kq_weight, gate1_weight, gate1_bias, gate2_weight, gate2_bias, groups, variant)


@torch.jit.unused
def _dispatch(x, kq_weight, w1, b1, w2, b2, groups: int, variant: str) -> Tuple[Tensor, Optional[Tensor]]:
    """The eager paths (see :func:`attend_and_compare`)."""
    _check_arguments(x, kq_weight, w1, groups, variant)
    with torch.autocast(device_type=x.device.type, enabled=False):
        tracing = torch.jit.is_tracing()
        if torch.compiler.is_compiling() or (tracing and _channels_last(x)):
            return attend_and_compare_ops(x, kq_weight, w1, b1, w2, b2, groups, variant)
        tensors = [t for t in (x, kq_weight, w1, b1, w2, b2) if t is not None]
        if not tracing and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return ACMFunction.apply(x, kq_weight, w1, b1, w2, b2, groups, variant)
        # Also under torch.jit.trace (ONNX export) for contiguous X: the tracer records the ops
        # eager inference runs, so traced and eager outputs are equal (and differentiable).
        y, orthogonality, _ = _forward(x, kq_weight, w1, b1, w2, b2, groups, variant, False)
        return y, orthogonality


def attend_and_compare_ops(
    x: Tensor,
    kq_weight: Optional[Tensor],
    gate1_weight: Optional[Tensor],
    gate1_bias: Optional[Tensor],
    gate2_weight: Optional[Tensor],
    gate2_bias: Optional[Tensor],
    groups: int,
    variant: str,
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`attend_and_compare` as plain differentiable PyTorch ops (same arguments and
    results, same identities, same dtypes), for TorchScript, tracers, ``torch.export`` and
    ``torch.compile``: a grouped conv for the logits, softmax, one matmul, a grouped conv
    gate, one multiply-add."""
    n, c, h, w = x.shape
    hw = h * w
    cg = c // groups
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = maps_per_group(variant)
    mu = x.mean(dim=(2, 3), dtype=cd)  # (N, C)
    d = torch.zeros_like(mu)
    orthogonality: Optional[Tensor] = None
    if kq_weight is not None:
        logits = F.conv2d(x, kq_weight.to(x.dtype), None, 1, 0, 1, groups)  # (N, G*M, H, W)
        maps = torch.softmax(logits.to(cd).reshape(n, groups, m, hw), dim=-1)  # (N, G, M, HW)
        xg = x.to(cd).reshape(n, groups, cg, hw)
        if m == 2:  # A_K - A_Q and A_Q pool K - Q and Q (K - Q exactly 0 for equal maps)
            maps = torch.stack([maps[:, :, 0] - maps[:, :, 1], maps[:, :, 1]], dim=2)
        pooled = torch.matmul(maps, xg.transpose(2, 3))  # (N, G, M, C/G)
        if m == 2:
            d = pooled[:, :, 0].reshape(n, c)
            q_raw = pooled[:, :, 1].reshape(n, c)
            k_raw = d + q_raw
            orthogonality = ((k_raw - mu) * (q_raw - mu)).mean(dim=1)
        else:
            d = pooled[:, :, 0].reshape(n, c) - mu
    if gate1_weight is None or gate1_bias is None or gate2_weight is None or gate2_bias is None:
        return x + d.to(x.dtype).view(n, c, 1, 1), orthogonality
    hidden = F.relu(F.conv2d(mu.view(n, c, 1, 1), gate1_weight.to(cd), gate1_bias.to(cd), 1, 0, 1, groups))
    gate = torch.sigmoid(F.conv2d(hidden, gate2_weight.to(cd), gate2_bias.to(cd), 1, 0, 1, groups))  # (N, C, 1, 1)
    y = torch.addcmul((gate.view(n, c) * d).to(x.dtype).view(n, c, 1, 1), x, gate.to(x.dtype))
    return y, orthogonality


# ----------------------------------------------------------------------------------------
# The fused eager implementation.


def _channels_last(x: Tensor) -> bool:
    """True when x is stored channels_last and not also contiguous (C == 1 or H == W == 1)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _in_layout(x: Tensor) -> Tensor:
    """x as contiguous or channels_last (a copy only for other layouts)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _batched(weight: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """(G, a, b) -> (N*G, a, b) in ``dtype`` (a small copy)."""
    g, a, b = weight.shape
    return weight.to(dtype).unsqueeze(0).expand(n, g, a, b).reshape(n * g, a, b)


def _rows_of_x(x: Tensor, groups: int) -> Tensor:
    """channels_last X (N, C, H, W) -> the (N, HW, G, C/G) view of its memory."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, groups, c // groups)


def _products(x: Tensor, rows: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """Per sample and group, rows @ X_g (C/G, HW) (+ bias (N*G, R, 1)): (N*G, R, HW) in X's
    dtype. ``rows`` is (G, R, C/G), shared by the samples, or (N*G, R, C/G)."""
    n, c, h, w = x.shape
    r = rows.shape[1]
    shared = rows.shape[0] == groups
    rows = rows.to(x.dtype)
    if not _channels_last(x):
        xg = x.view(n * groups, c // groups, h * w)
        if shared:
            rows = rows.unsqueeze(0).expand(n, groups, r, c // groups).reshape(n * groups, r, c // groups)
        if bias is None:
            return torch.bmm(rows, xg)
        return torch.baddbmm(bias.to(x.dtype), rows, xg)
    # channels_last: grouped 1x1 convolutions, one for the batch or one per sample.
    out = torch.empty(n, groups, r, h * w, dtype=x.dtype, device=x.device)
    if shared and bias is None:
        conv = F.conv2d(x, rows.view(groups * r, c // groups, 1, 1), None, groups=groups)  # (N, G*R, H, W)
        out.copy_(conv.permute(0, 2, 3, 1).reshape(n, h * w, groups, r).permute(0, 2, 3, 1))
        return out.view(n * groups, r, h * w)
    weight = rows.expand(n * groups, r, c // groups) if shared else rows
    weight = weight.reshape(n, groups * r, c // groups, 1, 1)
    flat_bias = None if bias is None else bias.to(x.dtype).reshape(n, groups * r)
    for i in range(n):
        conv = F.conv2d(x[i : i + 1], weight[i], None if flat_bias is None else flat_bias[i], groups=groups)
        out[i].copy_(conv.permute(0, 2, 3, 1).reshape(h * w, groups, r).permute(1, 2, 0))
    return out.view(n * groups, r, h * w)


def _pool(x: Tensor, maps: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """Per sample and group, maps (N*G, R, HW) @ X_g^T (HW, C/G): (N, G, R, C/G) in ``dtype``
    (X widened to it, as a transient copy, when X is in a lower precision)."""
    n, c, h, w = x.shape
    hw = h * w
    r = maps.shape[1]
    maps = maps.to(dtype)
    if not _channels_last(x):
        xg = x.view(n * groups, c // groups, hw).to(dtype)
        return torch.bmm(maps, xg.transpose(1, 2)).view(n, groups, r, c // groups)
    # channels_last: tiles of rows, so that the G strided products of a tile read it from cache.
    rows = _rows_of_x(x, groups)  # (N, HW, G, C/G)
    maps = maps.view(n, groups, r, hw)
    out = torch.zeros(n, groups, r, c // groups, dtype=dtype, device=x.device)
    tile = max(1, _tile_bytes() // (c * x.element_size()))
    for i in range(n):
        for start in range(0, hw, tile):
            part = rows[i, start : start + tile].permute(1, 0, 2).to(dtype)  # (G, tile, C/G)
            out[i].baddbmm_(maps[i, :, :, start : start + tile], part)
    return out


def _channel_sums(grad_y: Tensor, x: Tensor, with_dot: bool, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """sum_hw dY and (if ``with_dot``) sum_hw dY * X per channel: (N, C) each, in ``dtype``."""
    n, c, h, w = x.shape
    hw = h * w
    if not _channels_last(x):
        total = torch.sum(grad_y, dim=(2, 3), dtype=dtype)
        if not with_dot:
            return total, None
        dot = torch.bmm(grad_y.view(n * c, 1, hw), x.view(n * c, 1, hw).transpose(1, 2))
        return total, dot.view(n, c).to(dtype)
    g_rows = grad_y.permute(0, 2, 3, 1).reshape(n, hw, c)
    x_rows = x.permute(0, 2, 3, 1).reshape(n, hw, c)
    total = torch.sum(g_rows, dim=1, dtype=dtype)
    if not with_dot:
        return total, None
    dot = torch.zeros(n, c, dtype=dtype, device=x.device)
    tile = max(1, _TILE_BYTES // (c * x.element_size()))
    for i in range(n):
        for start in range(0, hw, tile):
            product = g_rows[i, start : start + tile] * x_rows[i, start : start + tile]
            dot[i] += torch.sum(product, dim=0, dtype=dtype)
    return total, dot


def _expand_into(grad_x: Tensor, left: Tensor, right: Tensor, groups: int) -> None:
    """grad_x (N, C, H, W) += per sample and group left (N*G, C/G, R) @ right (N*G, R, HW)."""
    n, c, h, w = grad_x.shape
    left = left.to(grad_x.dtype)
    right = right.to(grad_x.dtype)
    if not _channels_last(grad_x):
        grad_x.view(n * groups, c // groups, h * w).baddbmm_(left, right)
        return
    r = right.shape[1]
    weight = left.reshape(n, c, r, 1, 1)
    source = right.view(n, groups * r, h, w).contiguous(memory_format=torch.channels_last)
    for i in range(n):
        grad_x[i : i + 1].add_(F.conv2d(source[i : i + 1], weight[i], None, groups=groups))


def _channel_gate(mu: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """P = sigmoid(conv2(relu(conv1(mu)))) on vectors: mu (N, C) -> (hidden (G, N, C/2G),
    P (N, C), contiguous)."""
    n, c = mu.shape
    cd = mu.dtype
    w1 = w1.to(cd).view(groups, -1, c // groups)  # (G, C/2G, C/G)
    w2 = w2.to(cd).view(groups, c // groups, -1)  # (G, C/G, C/2G)
    mu_g = mu.view(n, groups, c // groups).transpose(0, 1)  # (G, N, C/G)
    hidden = torch.baddbmm(b1.to(cd).view(groups, 1, -1), mu_g, w1.transpose(1, 2)).relu_()  # (G, N, C/2G)
    z = torch.baddbmm(b2.to(cd).view(groups, 1, -1), hidden, w2.transpose(1, 2))  # (G, N, C/G)
    return hidden, z.sigmoid_().transpose(0, 1).reshape(n, c)


def _attend(x: Tensor, kq_weight: Tensor, groups: int, m: int, cd: torch.dtype, for_backward: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Passes 1 and 2 of the forward: X (N, C, H, W) -> [A_1 X - A_2 X, A_2 X .. A_M X, mu],
    (N, M+1, C) in ``cd`` (the first row is the shift d: K - Q for M = 2, K - mu for M = 1),
    and (if ``for_backward``) the maps' log-sum-exp (NG, M, 1). The map-sized temporaries are
    freed when it returns."""
    n, c, h, w = x.shape
    cg = c // groups
    # Pass 1 over X: [W_1 .. W_M; 0] @ X_g, the logits of the M maps of every group and a
    # row of zeros ((M+1) G / C of X); exp(L - max L) in place gives the maps up to their sums
    # (the row of zeros: ones, the uniform map up to HW).
    weight = kq_weight.view(groups, m, cg)
    rows = torch.cat([weight, weight.new_zeros([groups, 1, cg])], dim=1)  # (G, M+1, C/G)
    logits = _products(x, rows, None, groups).to(cd)  # (NG, M+1, HW)
    peak = logits.amax(dim=-1, keepdim=True)
    # (out of place, same values, when traced or scripted: the result may be run with
    # gradients, and amax needs the logits)
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        weights = torch.exp(logits - peak)
    else:
        weights = logits.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)  # (NG, M+1, 1)
    log_sum_exp: Optional[Tensor] = None
    if for_backward:
        log_sum_exp = (peak + total.log())[:, :m]
    # Pass 2 over X: with E = exp(L - max L) and S its sums, the rows [E_1 - (S_1 / S_2) E_2,
    # E_2 .. E_M, 1] @ X_g^T, divided by S, give A_1 X - A_2 X and A_2 X .. A_M X, mu. The
    # shift is so exactly 0 where the two maps are equal (the "identity" init), whatever order
    # a product kernel sums its rows in.
    ratio = total[:, :1] / total[:, 1:2]  # (NG, 1, 1)
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        weights = torch.cat([torch.addcmul(weights[:, :1], weights[:, 1:2], ratio, value=-1.0), weights[:, 1:]], dim=1)
    else:
        weights[:, :1].addcmul_(weights[:, 1:2], ratio, value=-1.0)
    pooled = _pool(x, weights, groups, cd) / total.view(n, groups, m + 1, 1)  # (N, G, M+1, C/G)
    return pooled.transpose(1, 2).reshape(n, m + 1, c), log_sum_exp


def _forward(
    x: Tensor,
    kq_weight: Optional[Tensor],
    w1: Optional[Tensor],
    b1: Optional[Tensor],
    w2: Optional[Tensor],
    b2: Optional[Tensor],
    groups: int,
    variant: str,
    for_backward: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tuple[Tensor, Optional[Tensor], Tensor, List[Tensor], Optional[Tensor], Optional[Tensor]]]]:
    """The shared forward: Y, orthogonality (N,) or None, and what backward needs (None unless
    ``for_backward``). Also what ``torch.jit.script`` compiles (the annotations and asserts
    are for it), so that scripted and eager ACM compute the same."""
    x = _in_layout(x)
    n, c, h, w = x.shape
    cd = _compute_dtype(x.dtype)
    m = maps_per_group(variant)
    log_sum_exp: Optional[Tensor] = None
    raw: List[Tensor] = []  # the M pooled vectors A_i X, (N, C) each
    shift: Optional[Tensor] = None  # d: K - Q (M = 2), K - mu (M = 1)
    if m == 0:
        mu = torch.mean(x, dim=(2, 3), dtype=cd)  # (N, C): one read of X
    else:
        assert kq_weight is not None
        pooled, log_sum_exp = _attend(x, kq_weight, groups, m, cd, for_backward)
        parts = pooled.unbind(dim=1)  # [d, A_2 X .. A_M X, mu]
        shift, mu = parts[0], parts[m]
        raw = [parts[0] + parts[1]] + list(parts[1:m])  # A_1 X = d + A_2 X
    orthogonality: Optional[Tensor] = None
    if m == 2:
        orthogonality = ((raw[0] - mu) * (raw[1] - mu)).mean(dim=1)  # (N,)
    hidden: Optional[Tensor] = None
    gate: Optional[Tensor] = None
    if w1 is None:
        assert shift is not None
        y = x + shift.to(x.dtype).view(n, c, 1, 1)  # X + (K - Q)
    else:
        assert b1 is not None and w2 is not None and b2 is not None
        hidden, gate = _channel_gate(mu, w1, b1, w2, b2, groups)  # (G, N, C/2G), (N, C)
        gate_x = gate.to(x.dtype).view(n, c, 1, 1)
        if shift is None:  # "PX"
            y = x * gate_x
        else:  # Pass 3: Y = P * X + P * d, one fused multiply-add in X's dtype.
            y = torch.addcmul((gate * shift).to(x.dtype).view(n, c, 1, 1), x, gate_x)
    if not for_backward:
        return y, orthogonality, None
    return y, orthogonality, (x, log_sum_exp, mu, raw, hidden, gate)


class ACMFunction(torch.autograd.Function):
    """(x, kq_weight, gate1 weight/bias, gate2 weight/bias, groups, variant) -> (Y, orthogonality).

    The arguments and results of :func:`attend_and_compare` (None where a variant has no
    such tensor). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, kq_weight, w1, b1, w2, b2, groups, variant):
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, orthogonality, saved = _forward(x, kq_weight, w1, b1, w2, b2, groups, variant, True)
        x_saved, log_sum_exp, mu, raw, hidden, gate = saved
        ctx.groups = groups
        ctx.variant = variant
        ctx.save_for_backward(x_saved, kq_weight, w1, w2, log_sum_exp, mu, hidden, gate, *raw)
        if orthogonality is None:
            return y, None
        return y, orthogonality

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_orth):
        device_type = ctx.saved_tensors[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return _backward(ctx, grad_y, grad_orth) + (None, None)


def _gate_backward(grad_gate, mu, w1, w2, hidden, gate, groups):
    """Gradients of P = sigmoid(W2 relu(W1 mu + b1) + b2) by hand on small tensors:
    grad P (N, C) -> (grad mu (N, C), grad W1, grad b1, grad W2, grad b2) in the compute dtype."""
    n, c = mu.shape
    cg = c // groups
    cd = mu.dtype
    w1g = w1.to(cd).view(groups, -1, cg)  # (G, C/2G, C/G)
    w2g = w2.to(cd).view(groups, cg, -1)  # (G, C/G, C/2G)
    grad_z = (grad_gate * gate * (1 - gate)).view(n, groups, cg).transpose(0, 1)  # (G, N, C/G)
    grad_w2 = torch.bmm(grad_z.transpose(1, 2), hidden)  # (G, C/G, C/2G)
    grad_pre = torch.bmm(grad_z, w2g) * (hidden > 0)  # (G, N, C/2G)
    grad_w1 = torch.bmm(grad_pre.transpose(1, 2), mu.view(n, groups, cg).transpose(0, 1))  # (G, C/2G, C/G)
    grad_mu = torch.bmm(grad_pre, w1g).transpose(0, 1).reshape(n, c)
    return grad_mu, grad_w1, grad_pre.sum(dim=1), grad_w2, grad_z.sum(dim=1)


def _backward(ctx, grad_y: Optional[Tensor], grad_orth: Optional[Tensor]) -> Tuple:
    x, kq_weight, w1, w2, log_sum_exp, mu, hidden, gate, *raw = ctx.saved_tensors
    groups, variant = ctx.groups, ctx.variant
    m = maps_per_group(variant)
    n, c, h, w = x.shape
    hw = h * w
    cg = c // groups
    cd = mu.dtype
    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous(memory_format=layout)
    # Pass 1 (reads): sum_hw dY, and <dY, X> per channel for P.
    grad_sum, grad_dot = _channel_sums(grad_y, x, gate is not None, cd)  # (N, C)
    shift = None
    if m == 2:
        shift = raw[0] - raw[1]
    elif m == 1:
        shift = raw[0] - mu
    grad_shift = grad_sum if gate is None else grad_sum * gate  # d(loss)/d(shift)
    grad_mu = torch.zeros_like(mu)
    grad_raw: List[Tensor] = []
    if m == 2:
        grad_raw = [grad_shift, -grad_shift]
        if grad_orth is not None:
            go = grad_orth.to(cd).view(n, 1) / c
            grad_raw = [grad_raw[0] + go * (raw[1] - mu), grad_raw[1] + go * (raw[0] - mu)]
            grad_mu = grad_mu - go * (raw[0] + raw[1] - 2 * mu)
    elif m == 1:
        grad_raw = [grad_shift]
        grad_mu = grad_mu - grad_shift
    gate_grads = None
    if gate is not None:
        grad_gate = grad_dot if shift is None else grad_dot + grad_sum * shift
        g_mu, *gate_grads = _gate_backward(grad_gate, mu, w1, w2, hidden, gate, groups)
        grad_mu = grad_mu + g_mu
    grad_weight = both = left = None
    if m > 0:
        # Pass 2 over X: [W; dR] @ X_g - [lse; c] gives L - log sum exp L (the maps are its exp:
        # no softmax) and dA - c with dA = dR . X, c = dR . R = sum_hw A dA: subtracted inside the
        # product, the centring of dA loses nothing to rounding.
        grad_r = torch.stack(grad_raw, dim=1).view(n, m, groups, cg).transpose(1, 2).reshape(n * groups, m, cg)
        raw_g = torch.stack(raw, dim=1).view(n, m, groups, cg).transpose(1, 2).reshape(n * groups, m, cg)
        centre = (grad_r * raw_g).sum(dim=-1, keepdim=True)  # (NG, M, 1)
        # In a lower precision than the compute dtype, lse rounded to it would shift the maps by
        # too much: it is subtracted after the product instead.
        exact = x.dtype == cd
        bias = torch.cat([log_sum_exp if exact else torch.zeros_like(log_sum_exp), centre], dim=1).neg_()
        weight = _batched(kq_weight.view(groups, m, cg), n, cd)  # (NG, M, C/G)
        both = _products(x, torch.cat([weight, grad_r], dim=1), bias, groups).to(cd)  # (NG, 2M, HW)
        maps, grad_maps = both[:, :m], both[:, m:]
        if not exact:
            maps.sub_(log_sum_exp)
        maps.exp_()  # A_1 .. A_M
        # dL = A * (dA - sum_hw A dA), in place in the lower half of `both`.
        inner = torch.bmm(maps, grad_maps.transpose(1, 2)).diagonal(dim1=1, dim2=2).unsqueeze(-1)  # (NG, M, 1)
        grad_maps.sub_(inner).mul_(maps)
        # Pass 3 over X: the gradient of the logits' weight.
        grad_weight = _pool(x, grad_maps, groups, cd).sum(dim=0).view(m * groups, cg, 1, 1)
        left = torch.cat([grad_r, weight], dim=1).transpose(1, 2)  # (NG, C/G, 2M)
    grad_x = None
    if ctx.needs_input_grad[0]:
        # Pass 4: grad X = P * dY + dmu / HW (one fused pass), += [dR, W^T] @ [A; dL].
        grad_mu_x = (grad_mu / hw).to(x.dtype).view(n, c, 1, 1)
        if gate is None:
            grad_x = grad_y + grad_mu_x
        else:
            grad_x = torch.addcmul(grad_mu_x, grad_y, gate.to(x.dtype).view(n, c, 1, 1))
        if m > 0:
            _expand_into(grad_x, left, both, groups)
    grads_gate = (None, None, None, None)
    if gate_grads is not None:
        grad_w1, grad_b1, grad_w2, grad_b2 = gate_grads
        grads_gate = (
            grad_w1.reshape(w1.shape).to(w1.dtype),
            grad_b1.reshape(-1).to(w1.dtype),
            grad_w2.reshape(w2.shape).to(w2.dtype),
            grad_b2.reshape(-1).to(w2.dtype),
        )
    kq_grad = None if grad_weight is None else grad_weight.to(kq_weight.dtype)
    return (grad_x, kq_grad) + grads_gate
