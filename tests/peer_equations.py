"""The peers' equations written out literally, position by position, in float64 (test helpers).

Each function takes a module's parameters (as plain tensors) and one input x (C, H, W) and
returns the output (C, H, W), looping over positions the way the papers write the sums.
"""
import math

import torch


def conv1x1(weight, bias, vector):
    """A 1x1 conv applied to one position's vector (C_in,): weight (C_out, C_in, 1, 1)."""
    out = weight[:, :, 0, 0] @ vector
    return out if bias is None else out + bias


def softmax(values):
    """softmax of a list of scalars, written out."""
    top = max(float(v) for v in values)
    exps = [math.exp(float(v) - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def non_local(p, x):
    """Z_i = X_i + W_z sum_j softmax_j(theta_i . phi_j / sqrt(C')) g_j (NL, embedded Gaussian)."""
    c, h, w = x.shape
    positions = [(i, j) for i in range(h) for j in range(w)]
    theta = {u: conv1x1(p["theta.weight"], p["theta.bias"], x[:, u[0], u[1]]) for u in positions}
    phi = {u: conv1x1(p["phi.weight"], p["phi.bias"], x[:, u[0], u[1]]) for u in positions}
    g = {u: conv1x1(p["g.weight"], p["g.bias"], x[:, u[0], u[1]]) for u in positions}
    inner = p["theta.weight"].shape[0]
    z = torch.empty_like(x)
    for u in positions:
        f = softmax([theta[u] @ phi[v] / math.sqrt(inner) for v in positions])
        y = sum(f_v * g[v] for f_v, v in zip(f, positions))
        z[:, u[0], u[1]] = x[:, u[0], u[1]] + conv1x1(p["out.weight"], p["out.bias"], y)
    return z


def criss_cross(p, x, recurrence):
    """H'_u = gamma * sum_{v on u's row and column, u once} softmax_v(Q_u . K_v) V_v + X_u, R times."""
    for _ in range(recurrence):
        c, h, w = x.shape
        q = {(i, j): conv1x1(p["query.weight"], p["query.bias"], x[:, i, j]) for i in range(h) for j in range(w)}
        k = {(i, j): conv1x1(p["key.weight"], p["key.bias"], x[:, i, j]) for i in range(h) for j in range(w)}
        v = {(i, j): conv1x1(p["value.weight"], p["value.bias"], x[:, i, j]) for i in range(h) for j in range(w)}
        out = torch.empty_like(x)
        for i in range(h):
            for j in range(w):
                path = [(r, j) for r in range(h) if r != i] + [(i, col) for col in range(w)]  # H + W - 1 positions
                assert len(path) == h + w - 1 and len(set(path)) == len(path)
                a = softmax([q[(i, j)] @ k[u] for u in path])
                out[:, i, j] = p["gamma"][0] * sum(a_u * v[u] for a_u, u in zip(a, path)) + x[:, i, j]
        x = out
    return x


def global_context(p, x):
    """Z = X + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k x_j) x_j)) (GC, att pooling, channel add)."""
    c, h, w = x.shape
    positions = [(i, j) for i in range(h) for j in range(w)]
    a = softmax([conv1x1(p["attention_logits.weight"], p["attention_logits.bias"], x[:, i, j])[0] for i, j in positions])
    context = sum(a_u * x[:, i, j] for a_u, (i, j) in zip(a, positions))
    t = conv1x1(p["transform.0.weight"], p["transform.0.bias"], context)
    mean, var = t.mean(), ((t - t.mean()) ** 2).mean()
    t = (t - mean) / torch.sqrt(var + 1e-5) * p["transform.1.weight"].flatten() + p["transform.1.bias"].flatten()
    t = conv1x1(p["transform.3.weight"], p["transform.3.bias"], torch.clamp(t, min=0))
    return x + t[:, None, None]


def cbam(p, x):
    """Y = M_s(X') * X', X' = M_c(X) * X (CBAM without a norm after the spatial conv)."""
    c, h, w = x.shape

    def mlp(vector):
        hidden = torch.clamp(conv1x1(p["channel_mlp.0.weight"], p["channel_mlp.0.bias"], vector), min=0)
        return conv1x1(p["channel_mlp.2.weight"], p["channel_mlp.2.bias"], hidden)

    average = torch.stack([sum(x[ch, i, j] for i in range(h) for j in range(w)) / (h * w) for ch in range(c)])
    maximum = torch.stack([max(x[ch, i, j] for i in range(h) for j in range(w)) for ch in range(c)])
    refined = x * torch.sigmoid(mlp(average) + mlp(maximum))[:, None, None]
    pooled = torch.stack([refined.max(dim=0).values, refined.mean(dim=0)])  # (2, H, W): max first, then mean
    kernel = p["spatial.weight"][0]  # (2, k, k)
    size = kernel.shape[-1]
    pad = size // 2
    out = torch.empty_like(refined)
    for i in range(h):
        for j in range(w):
            total = p["spatial.bias"][0] if "spatial.bias" in p else 0.0
            for ch in range(2):
                for di in range(size):
                    for dj in range(size):
                        r, col = i + di - pad, j + dj - pad
                        if 0 <= r < h and 0 <= col < w:
                            total = total + kernel[ch, di, dj] * pooled[ch, r, col]
            out[:, i, j] = refined[:, i, j] * torch.sigmoid(total)
    return out
