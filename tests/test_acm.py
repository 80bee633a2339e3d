"""ACM against the paper's equations, written out literally per group and per channel."""
import pytest
import torch

from acm_d2 import ACM


def literal_acm(x, w_k, b_k, w_q, b_q, w1, b1, w2, b2, groups):
    """Eq. of the paper, one group and one sample at a time.

    x: (N, C, H, W); w_k, w_q: (G, C/G) and b_k, b_q: (G,) the 1x1 convs of K and Q;
    w1: (C/2, C/G), b1: (C/2,), w2: (C, C/(2G)), b2: (C,) the grouped convs of P.
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
        ys.append(p[:, None, None] * (xi + (k - q)[:, None, None]))
        orth.append((k * q).sum() / c)
    return torch.stack(ys), torch.stack(orth)


def literal_from_module(module: ACM, x):
    """The literal equations with the module's weights, in float64 (then cast back to x's dtype)."""
    g = module.groups
    w = module.kq_logits.weight.detach().double().view(g, 2, -1)
    b = module.kq_logits.bias.detach().double().view(g, 2)
    conv1, conv2 = module.channel_gate[0], module.channel_gate[2]
    y, orth = literal_acm(
        x.double(), w[:, 0], b[:, 0], w[:, 1], b[:, 1],
        conv1.weight.detach().double().flatten(1), conv1.bias.detach().double(),
        conv2.weight.detach().double().flatten(1), conv2.bias.detach().double(), g,
    )
    return y.to(x.dtype), orth.float()


def randomized_acm(channels, groups, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    module = ACM(channels, groups=groups).to(dtype)
    with torch.no_grad():  # non-zero biases so that every term of the equations matters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_matches_literal_equations(groups):
    module = randomized_acm(64, groups).train()
    module.record_orthogonality = True
    x = torch.randn(3, 64, 5, 7) + 0.5
    y = module(x)
    y_lit, orth_lit = literal_from_module(module, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_lit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.last_orthogonality, orth_lit, atol=1e-5, rtol=1e-5)
    # per-sample results differ (the module does not mix samples)
    assert not torch.allclose(module.last_orthogonality[0], module.last_orthogonality[1])
    torch.testing.assert_close(module(x[1:2]), y[1:2], atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    module = randomized_acm(8, 2, dtype=torch.float64).train()
    module.record_orthogonality = True
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]

    def run(x, *weights):
        y = torch.func.functional_call(module, dict(zip(names, weights)), (x,))
        return y, module.last_orthogonality

    weights = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    torch.autograd.gradcheck(run, (x, *weights), eps=1e-6, atol=1e-5)


def test_gradients_match_literal():
    module = randomized_acm(16, 4).train()
    module.record_orthogonality = True
    x = torch.randn(2, 16, 4, 6, requires_grad=True)
    upstream = torch.randn(2, 16, 4, 6)
    (module(x) * upstream).sum().backward()
    grad_fast = x.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    y_lit, _ = literal_from_module(module, x2)
    (y_lit * upstream).sum().backward()
    torch.testing.assert_close(grad_fast, x2.grad, atol=1e-5, rtol=1e-5)


def test_initialisation_as_authors():
    torch.manual_seed(0)
    module = ACM(512, groups=32)
    for conv in (module.kq_logits, module.channel_gate[0], module.channel_gate[2]):
        assert torch.count_nonzero(conv.bias) == 0
        fan_out = conv.out_channels  # 1x1 kernels
        expected_std = (2.0 / fan_out) ** 0.5
        assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.1
    assert module.kq_logits.weight.shape == (64, 16, 1, 1)
    assert module.channel_gate[0].weight.shape == (256, 16, 1, 1)
    assert module.channel_gate[2].weight.shape == (512, 8, 1, 1)


def test_attention_maps_sum_to_one():
    module = randomized_acm(32, 8)
    maps = module.attention_maps(torch.randn(2, 32, 5, 3))
    assert maps.shape == (2, 8, 2, 5, 3)
    torch.testing.assert_close(maps.sum(dim=(3, 4)), torch.ones(2, 8, 2))


def test_no_orthogonality_recorded_unless_asked():
    module = randomized_acm(16, 4).train()
    module(torch.randn(1, 16, 3, 3))
    assert module.last_orthogonality is None


@pytest.mark.parametrize(
    "channels, groups, message",
    [
        (64, 0, "MODEL.ACM.GROUPS must be an integer >= 1, got 0"),
        (64, 64, "channels=64, groups=64"),
        (96, 32, "channels=96, groups=32"),
    ],
)
def test_bad_groups(channels, groups, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ACM(channels, groups=groups)
