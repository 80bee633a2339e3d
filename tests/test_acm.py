"""ACM against the paper's equations, written out literally per group and per channel."""
import pytest
import torch

from acm_d2 import ACM, ACMRecorder, ReferenceACM
from equations import literal_from_module, randomized_acm


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_matches_literal_equations(groups):
    module = randomized_acm(64, groups).train()
    x = torch.randn(3, 64, 5, 7) + 0.5
    y, orthogonality = module.forward_with_orthogonality(x)
    y_lit, orth_lit = literal_from_module(module, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_lit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(orthogonality, orth_lit, atol=1e-5, rtol=1e-5)
    # per-sample results differ (the module does not mix samples)
    assert not torch.allclose(orthogonality[0], orthogonality[1])
    torch.testing.assert_close(module(x[1:2]), y[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant, parameters", [
    ("P(X+(K-Q))", {"kq_logits.weight": (16, 4, 1, 1), "channel_gate.0.weight": (16, 4, 1, 1)}),
    ("X+(K-Q)", {"kq_logits.weight": (16, 4, 1, 1)}),
    ("P(X+K)", {"kq_logits.weight": (8, 4, 1, 1), "channel_gate.0.weight": (16, 4, 1, 1)}),
    ("PX", {"channel_gate.0.weight": (16, 4, 1, 1)}),
])
def test_variants_match_their_literal_equations(variant, parameters):
    module = randomized_acm(32, 8, variant=variant).train()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if k.endswith("0.weight") or k.startswith("kq")}
    assert shapes == parameters
    x = torch.randn(2, 32, 4, 5, requires_grad=True)
    y, orthogonality = module.forward_with_orthogonality(x)
    y_lit, orth_lit = literal_from_module(module, x.detach())
    torch.testing.assert_close(y, y_lit, atol=1e-5, rtol=1e-5)
    if variant in ("P(X+(K-Q))", "X+(K-Q)"):
        torch.testing.assert_close(orthogonality, orth_lit, atol=1e-5, rtol=1e-5)
    else:
        assert orthogonality is None
    y.sum().backward()  # every parameter takes part (DDP needs that)
    assert all(p.grad is not None for p in module.parameters())


def test_gradcheck_float64():
    module = randomized_acm(8, 2, dtype=torch.float64).train()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]

    def run(x, *weights):
        with ACMRecorder() as recorder:
            y = torch.func.functional_call(module, dict(zip(names, weights)), (x,))
        return y, recorder.calls[0].orthogonality

    weights = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    torch.autograd.gradcheck(run, (x, *weights), eps=1e-6, atol=1e-5)


def test_gradients_match_literal():
    module = randomized_acm(16, 4).train()
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
    assert module.kq_logits.bias is None  # softmax is shift-invariant: the paper's bias changes nothing
    for conv in (module.kq_logits, module.channel_gate[0], module.channel_gate[2]):
        assert conv.bias is None or torch.count_nonzero(conv.bias) == 0
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


def test_reports_to_the_recorder_only_and_keeps_no_state():
    module = randomized_acm(16, 4).train()
    x = torch.randn(2, 16, 3, 3)
    before = dict(vars(module))
    module(x)  # no recorder: nothing is kept anywhere
    with ACMRecorder() as outer:
        module(x)
        with ACMRecorder() as inner:
            module(x[:1])
        module(x)
    assert [c.input.shape[0] for c in inner.calls] == [1]
    assert [c.input.shape[0] for c in outer.calls] == [2, 1, 2]
    assert outer.calls[0].module is module
    torch.testing.assert_close(outer.calls[0].orthogonality, module.forward_with_orthogonality(x)[1])
    assert dict(vars(module)).keys() == before.keys()


def test_loads_older_layouts():
    """The authors' standalone module (ReferenceACM's keys) and acm-d2's version 1 (with a
    kq_logits bias) load into ACM and compute the same outputs."""
    torch.manual_seed(0)
    reference = ReferenceACM(32, groups=8)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    module = ACM(32, groups=8)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(2, 32, 4, 4)
    y_ref, orth_ref = reference(x)
    y, orth = module.forward_with_orthogonality(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(orth, orth_ref, atol=1e-6, rtol=1e-5)
    version1 = dict(module.state_dict(), **{"kq_logits.bias": torch.randn(16)})
    ACM(32, groups=8).load_state_dict(version1)  # strict: the bias is dropped, nothing else is missing


@pytest.mark.parametrize(
    "channels, groups, variant, message",
    [
        (64, 0, "P(X+(K-Q))", "MODEL.ACM.GROUPS must be an integer >= 1, got 0"),
        (64, 64, "P(X+(K-Q))", "channels=64, groups=64"),
        (96, 32, "P(X+(K-Q))", "channels=96, groups=32"),
        (64, 8, "P(X+Q)", "MODEL.ACM.VARIANT must be one of ['P(X+(K-Q))', 'X+(K-Q)', 'P(X+K)', 'PX'], got 'P(X+Q)'"),
    ],
)
def test_bad_settings(channels, groups, variant, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        ACM(channels, groups=groups, variant=variant)
