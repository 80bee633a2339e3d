"""The Attend-and-Compare Module as one autograd Function, near the memory-traffic floor.

ACM costs few FLOPs but touches the whole feature map X (N, C, H, W): its cost is the number
of passes over X (and, on a CPU, the number of fresh X-sized tensors, since writing newly
allocated memory is several times slower than reading, and the number of parallel kernels).
This Function computes exactly the module of :mod:`acm_d2.modeling.acm` (the equations are
in ``shared/ACM_SPEC.md``), using three exact identities:

* softmax is shift-invariant, so the maps of X and of X - mu are the same, and the logits'
  bias (constant over positions) changes nothing: its gradient is exactly zero;
* the maps sum to one, so K - Q = (A_K - A_Q) X: no X - mu tensor; mu only enters the
  orthogonality term, through K_raw - mu and Q_raw - mu;
* mu is X pooled with the uniform map, the softmax of a row of zero logits.

Forward, 2 reads of X and 1 read + 1 write for Y:
  1. one batched product [W_K; W_Q; 0] @ X_g gives the logits of both maps of every group
     and a zero row (read X); one softmax on that (N*G, 3, HW) tensor (3G/C of X);
  2. one batched product [A_K; A_Q; 1/HW] @ X_g^T gives K_raw, Q_raw and mu (read X);
  3. Y = P * X + P * (K - Q): one fused multiply-add (read X, write Y).

Backward, 3 reads of X, 3 of grad Y, and grad X written by one fused pass plus one in-place
product:
  1. sum over HW of grad Y and <grad Y, X> per channel (reads) give every small gradient;
  2. one batched product [W_K; W_Q; dK; dQ] @ X_g recomputes the logits (with the saved
     log-sum-exp: the maps, without a softmax) together with the gradient dA w.r.t. the
     maps (read X); dL = A * (dA - sum A dA) on the small tensor;
  3. grad W_KQ = dL @ X_g^T (read X);
  4. grad X = P * grad Y + dmu / HW (one fused pass writing grad X), then
     grad X += [dK, dQ, W_K^T, W_Q^T] @ [A_K; A_Q; dL_K; dL_Q] in place (one product).

Saved for backward: X itself (an input, no copy) and vectors of size N*C or N*G*2; nothing
of the size of X or of the maps. Low-precision inputs (autocast) keep X, Y, grad X and the
logits product in X's dtype (like the authors' convs under autocast); the pooling product
runs on X widened to float32 (a transient copy, only for low-precision X), and the softmax,
the pooled vectors, P and every reduction are float32 (float64 for float64 inputs).
"""
from typing import Optional, Tuple

import torch

__all__ = ["ACMFunction", "acm_forward", "acm_attention_logits"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and lower precisions, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (N*G, C/G, HW) view (a copy only if x is not contiguous)."""
    n, c, h, w = x.shape
    return x.contiguous().view(n * groups, c // groups, h * w)


def _batched(weight: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(G, a, b) -> (N*G, a, b) in ``dtype`` (a small copy)."""
    g, a, b = weight.shape
    return weight.to(dtype).unsqueeze(0).expand(n, g, a, b).reshape(n * g, a, b)


def acm_attention_logits(x: torch.Tensor, kq_weight: torch.Tensor, kq_bias: torch.Tensor, groups: int) -> torch.Tensor:
    """Logits of the K and Q maps, bias included: (N, C, H, W) -> (N*G, 2, HW) in the compute
    dtype (float32; float64 for float64 x). ``kq_weight`` (2G, C/G, 1, 1) has interleaved
    outputs [K_0, Q_0, K_1, Q_1, ...]."""
    n, c = x.shape[:2]
    weight = _batched(kq_weight.view(groups, 2, c // groups), n, x.dtype)  # (NG, 2, C/G)
    bias = _batched(kq_bias.view(groups, 2, 1), n, x.dtype)  # (NG, 2, 1)
    return torch.baddbmm(bias, weight, _grouped(x, groups)).to(_compute_dtype(x.dtype))  # (NG, 2, HW)


def _channel_gate(mu: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, groups: int):
    """P = sigmoid(conv2(relu(conv1(mu)))) on vectors: mu (N, C) -> (hidden (N, G, C/2G), P (N, C))."""
    n, c = mu.shape
    cd = mu.dtype
    w1 = w1.to(cd).view(groups, -1, c // groups)  # (G, C/2G, C/G)
    w2 = w2.to(cd).view(groups, c // groups, -1)  # (G, C/G, C/2G)
    mu_g = mu.view(n, groups, c // groups).permute(1, 2, 0)  # (G, C/G, N)
    hidden = torch.baddbmm(b1.to(cd).view(groups, -1, 1), w1, mu_g).relu_()  # (G, C/2G, N)
    z = torch.baddbmm(b2.to(cd).view(groups, -1, 1), w2, hidden)  # (G, C/G, N)
    return hidden.permute(2, 0, 1), z.sigmoid_().permute(2, 0, 1).reshape(n, c)  # (N, G, C/2G), (N, C)


def _forward(x, kq_weight, w1, b1, w2, b2, groups, for_backward: bool = True):
    """The shared forward: returns Y, orthogonality (N,), and what backward needs (None
    unless ``for_backward``). The logits' bias is not needed (softmax is shift-invariant)."""
    n, c, h, w = x.shape
    hw = h * w
    cd = _compute_dtype(x.dtype)
    xg = _grouped(x, groups)  # (NG, C/G, HW)
    # Pass 1 over X: [W_K; W_Q; 0] @ X_g, the logits of both maps of every group and a row of
    # zeros in one product; its softmax (3G/C the size of X) is A_K, A_Q and 1/HW.
    weight = kq_weight.view(groups, 2, c // groups)  # (G, 2, C/G)
    weight = torch.cat([weight, weight.new_zeros(groups, 1, c // groups)], dim=1)  # (G, 3, C/G)
    logits = torch.bmm(_batched(weight, n, x.dtype), xg)  # (NG, 3, HW), X's dtype
    logits = logits.to(cd) if logits.dtype != cd else logits
    maps = torch.softmax(logits, dim=-1)  # (NG, 3, HW); each row sums to 1
    log_sum_exp = None
    if for_backward:
        # log sum exp L = max L - log max A (the largest weight is 1 / sum exp(L - max L)).
        log_sum_exp = logits[:, :2].amax(dim=-1, keepdim=True) - maps[:, :2].amax(dim=-1, keepdim=True).log()
    del logits
    # Pass 2 over X: [A_K; A_Q; 1/HW] @ X_g^T gives K_raw, Q_raw and mu in one product, in the
    # compute dtype: low-precision X (autocast) is widened for it, so that the pooled vectors
    # are float32 sums of float32 weights.
    pooled = torch.bmm(maps, xg.transpose(1, 2).to(cd))  # (NG, 3, C/G)
    uniform = maps[:1, 2, :1] * hw  # (1, 1): 1 up to the rounding of 1/HW
    pooled = pooled.view(n, groups, 3, c // groups).transpose(1, 2).reshape(n, 3, c)
    k_raw, q_raw, mu = pooled.unbind(dim=1)  # 3 x (N, C)
    mu = mu / uniform
    hidden, gate = _channel_gate(mu, w1, b1, w2, b2, groups)  # (N, G, C/2G), (N, C)
    shift = gate * (k_raw - q_raw)  # (N, C): P * (K - Q), mu cancels
    orthogonality = ((k_raw - mu) * (q_raw - mu)).mean(dim=1)  # (N,)
    # Pass 3: Y = P * X + P * (K - Q), one fused multiply-add in X's dtype.
    y = torch.addcmul(shift.to(x.dtype).view(n, c, 1, 1), x, gate.to(x.dtype).view(n, c, 1, 1))
    if not for_backward:
        return y, orthogonality, None
    return y, orthogonality, (log_sum_exp, mu, k_raw, q_raw, hidden, gate)


def acm_forward(x, kq_weight, kq_bias, w1, b1, w2, b2, groups):
    """ACM without autograd bookkeeping (for inference): returns (Y, orthogonality (N,))."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        y, orthogonality, _ = _forward(x.contiguous(), kq_weight, w1, b1, w2, b2, groups, for_backward=False)
    return y, orthogonality


class ACMFunction(torch.autograd.Function):
    """(x, kq_weight, kq_bias, gate1 weight/bias, gate2 weight/bias, groups) -> (Y, orthogonality).

    Shapes: x (N, C, H, W); kq_weight (2G, C/G, 1, 1), kq_bias (2G,); gate weights
    (C/2, C/G, 1, 1), (C/2,), (C, C/2G, 1, 1), (C,). Y has x's shape and dtype;
    orthogonality (N,) is float32 (float64 for float64 x). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, kq_weight, kq_bias, w1, b1, w2, b2, groups):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.contiguous()
            y, orthogonality, saved = _forward(x, kq_weight, w1, b1, w2, b2, groups)
        ctx.groups = groups
        ctx.save_for_backward(x, kq_weight, kq_bias, w1, w2, *saved)
        return y, orthogonality

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_orth):
        device_type = ctx.saved_tensors[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return _backward(ctx, grad_y, grad_orth) + (None,)


def _backward(ctx, grad_y: Optional[torch.Tensor], grad_orth: Optional[torch.Tensor]) -> Tuple:
    x, kq_weight, kq_bias, w1, w2, log_sum_exp, mu, k_raw, q_raw, hidden, gate = ctx.saved_tensors
    groups = ctx.groups
    n, c, h, w = x.shape
    hw = h * w
    cg = c // groups
    cd = mu.dtype
    xg = _grouped(x, groups)  # (NG, C/G, HW)
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    # Pass 1 (reads): sum_hw dY and <dY, X> per channel give every small gradient.
    grad_shift = torch.sum(grad_y, dim=(2, 3), dtype=cd)  # (N, C)
    grad_gate = torch.bmm(grad_y.view(n * c, 1, hw), x.view(n * c, 1, hw).transpose(1, 2)).view(n, c).to(cd)
    grad_gate = grad_gate + grad_shift * (k_raw - q_raw)  # shift = P * (K - Q)
    grad_k = grad_shift * gate
    grad_q = -grad_k
    grad_mu = torch.zeros_like(mu)
    if grad_orth is not None:
        go = grad_orth.to(cd).view(n, 1) / c
        grad_k = grad_k + go * (q_raw - mu)
        grad_q = grad_q + go * (k_raw - mu)
        grad_mu = grad_mu - go * (k_raw + q_raw - 2 * mu)
    # The channel gate P = sigmoid(W2 relu(W1 mu + b1) + b2), by hand on small tensors.
    w1g = w1.to(cd).view(groups, -1, cg)  # (G, C/2G, C/G)
    w2g = w2.to(cd).view(groups, cg, -1)  # (G, C/G, C/2G)
    grad_z = (grad_gate * gate * (1 - gate)).view(n, groups, cg)  # (N, G, C/G)
    grad_w2 = torch.einsum("ngc,ngh->gch", grad_z, hidden)
    grad_b2 = grad_z.sum(dim=0)
    grad_pre = torch.einsum("gch,ngc->ngh", w2g, grad_z) * (hidden > 0)  # (N, G, C/2G)
    grad_w1 = torch.einsum("ngh,ngc->ghc", grad_pre, mu.view(n, groups, cg))
    grad_b1 = grad_pre.sum(dim=0)
    grad_mu = grad_mu + torch.einsum("ghc,ngh->ngc", w1g, grad_pre).reshape(n, c)
    # Pass 2 over X: [W_K; W_Q; dK; dQ] @ X_g - [lse_K; lse_Q; c_K; c_Q] gives L - log sum exp L
    # (the maps are its exp: no softmax) and dA - c with dA = dK . X, c = dK . K_raw = sum_hw
    # A dA: subtracted inside the product, the centring of dA loses nothing to rounding (as
    # with the centred X of the equations).
    grad_kq = torch.stack([grad_k, grad_q], dim=1)  # (N, 2, C)
    grad_kq = grad_kq.view(n, 2, groups, cg).transpose(1, 2).reshape(n * groups, 2, cg)  # (NG, 2, C/G)
    kq_raw = torch.stack([k_raw, q_raw], dim=1).view(n, 2, groups, cg).transpose(1, 2).reshape(n * groups, 2, cg)
    centre = (grad_kq * kq_raw).sum(dim=-1, keepdim=True)  # (NG, 2, 1)
    # In a lower precision than the compute dtype, lse rounded to it would shift the maps by
    # too much: it is subtracted after the product instead.
    exact = x.dtype == cd
    bias = torch.cat([log_sum_exp if exact else torch.zeros_like(log_sum_exp), centre], dim=1)
    bias = bias.neg_().to(x.dtype)  # (NG, 4, 1)
    weight = _batched(kq_weight.view(groups, 2, cg), n, cd)  # (NG, 2, C/G)
    rows = torch.cat([weight, grad_kq], dim=1).to(x.dtype)  # (NG, 4, C/G)
    both = torch.baddbmm(bias, rows, xg)  # (NG, 4, HW)
    both = both.to(cd) if both.dtype != cd else both
    maps, grad_maps = both[:, :2], both[:, 2:]
    if not exact:
        maps.sub_(log_sum_exp)
    maps.exp_()  # A_K, A_Q
    # dL = A * (dA - sum_hw A dA), in place in the lower half of `both` (sum_hw A dA again,
    # which removes what rounding left of c).
    inner = torch.bmm(maps, grad_maps.transpose(1, 2)).diagonal(dim1=1, dim2=2)  # (NG, 2)
    grad_maps.sub_(inner.unsqueeze(-1)).mul_(maps)
    # Pass 3 over X: the gradient of the logits' weight; that of their bias is exactly 0.
    grad_weight = torch.bmm(grad_maps.to(x.dtype), xg.transpose(1, 2)).to(cd)  # (NG, 2, C/G)
    grad_weight = grad_weight.view(n, groups * 2, cg).sum(dim=0).view(2 * groups, cg, 1, 1)
    grad_x = None
    if ctx.needs_input_grad[0]:
        # Pass 4: grad X = P * dY + dmu / HW (one fused pass), then
        # += [dK, dQ, W_K^T, W_Q^T] @ [A_K; A_Q; dL_K; dL_Q] in place (one product).
        grad_x = torch.addcmul(
            (grad_mu / hw).to(x.dtype).view(n, c, 1, 1), grad_y, gate.to(x.dtype).view(n, c, 1, 1)
        )
        left = torch.cat([grad_kq, weight], dim=1).transpose(1, 2).to(x.dtype)  # (NG, C/G, 4)
        grad_x.view(n * groups, cg, hw).baddbmm_(left, both.to(x.dtype))
    return (
        grad_x,
        grad_weight.to(kq_weight.dtype),
        torch.zeros_like(kq_bias),
        grad_w1.reshape(w1.shape).to(w1.dtype),
        grad_b1.reshape(-1).to(w1.dtype),
        grad_w2.reshape(w2.shape).to(w2.dtype),
        grad_b2.reshape(-1).to(w2.dtype),
    )
