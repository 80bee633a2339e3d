"""The paper's equations written out literally, per sample, group and channel: the yardstick
of the tests."""
import torch

from acm_d2 import ACM


def literal_acm(x, w_k, b_k, w_q, b_q, w1, b1, w2, b2, groups, use_k=True, use_q=True):
    """Eq. of the paper, one group and one sample at a time.

    x: (N, C, H, W); w_k, w_q: (G, C/G) and b_k, b_q: (G,) the 1x1 convs of K and Q;
    w1: (C/2, C/G), b1: (C/2,), w2: (C, C/(2G)), b2: (C,) the grouped convs of P.
    ``use_k`` / ``use_q`` False drop K / Q (the paper's ablation variants).
    Returns Y (N, C, H, W) and the orthogonality term (N,).
    """
    n, c, h, w = x.shape
    cg = c // groups
    ys, orth = [], []
    for i in range(n):
        xi = x[i]  # (C, H, W)
        mu = xi.mean(dim=(1, 2))  # (C,)
        centered = xi - mu[:, None, None]  # X - mu
        k = torch.empty(c, dtype=x.dtype)
        q = torch.empty(c, dtype=x.dtype)
        for g in range(groups):
            part = centered[g * cg:(g + 1) * cg].reshape(cg, h * w)  # (C/G, HW)
            a_k = torch.softmax(w_k[g] @ part + b_k[g], dim=0)  # (HW,)
            a_q = torch.softmax(w_q[g] @ part + b_q[g], dim=0)
            k[g * cg:(g + 1) * cg] = (part * a_k).sum(dim=1)
            q[g * cg:(g + 1) * cg] = (part * a_q).sum(dim=1)
        hidden = torch.empty(c // 2, dtype=x.dtype)
        hg = c // 2 // groups
        for g in range(groups):
            hidden[g * hg:(g + 1) * hg] = w1[g * hg:(g + 1) * hg] @ mu[g * cg:(g + 1) * cg] + b1[g * hg:(g + 1) * hg]
        hidden = torch.relu(hidden)
        p = torch.empty(c, dtype=x.dtype)
        for g in range(groups):
            p[g * cg:(g + 1) * cg] = w2[g * cg:(g + 1) * cg] @ hidden[g * hg:(g + 1) * hg] + b2[g * cg:(g + 1) * cg]
        p = torch.sigmoid(p)
        k = k if use_k else torch.zeros_like(k)
        q = q if use_q else torch.zeros_like(q)
        ys.append(p[:, None, None] * (xi + (k - q)[:, None, None]))
        orth.append((k * q).sum() / c)
    return torch.stack(ys), torch.stack(orth)


def literal_from_module(module: ACM, x):
    """The literal equations of the module's variant with its weights, in float64 (Y cast back
    to x's dtype): the full module's equations with P = 1 without a gate, Q = 0 without Q,
    and K = Q = 0 without maps."""
    g, c = module.groups, module.channels
    zeros_w, zeros_b = torch.zeros(g, c // g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
    w_k = w_q = zeros_w
    if module.kq_logits is not None:
        w = module.kq_logits.weight.detach().double().view(g, -1, c // g)
        w_k = w[:, 0]
        w_q = w[:, 1] if w.shape[1] == 2 else zeros_w
    if module.channel_gate is not None:
        conv1, conv2 = module.channel_gate[0], module.channel_gate[2]
        gate = (conv1.weight.detach().double().flatten(1), conv1.bias.detach().double(),
                conv2.weight.detach().double().flatten(1), conv2.bias.detach().double())
    else:  # P = sigmoid(+inf) = 1
        gate = (torch.zeros(c // 2, c // g, dtype=torch.float64), torch.zeros(c // 2, dtype=torch.float64),
                torch.zeros(c, c // (2 * g), dtype=torch.float64), torch.full((c,), float("inf"), dtype=torch.float64))
    y, orth = literal_acm(x.double(), w_k, zeros_b, w_q, zeros_b, *gate, g, use_k=module.kq_logits is not None,
                          use_q=module.variant in ("P(X+(K-Q))", "X+(K-Q)"))
    return y.to(x.dtype), orth.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def randomized_acm(channels, groups, dtype=torch.float32, seed=0, variant="P(X+(K-Q))"):
    torch.manual_seed(seed)
    module = ACM(channels, groups=groups, variant=variant).to(dtype)
    with torch.no_grad():  # non-zero biases so that every term of the equations matters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module
