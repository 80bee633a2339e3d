"""attend_and_compare against ReferenceACM: the cases and runners shared by test_acm_fast.py
and test_cuda.py."""
import torch

from acm_d2 import ReferenceACM
from acm_d2.modeling.acm_function import attend_and_compare

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_reference(channels, groups, variant, dtype=torch.float64, seed=0):
    """A ReferenceACM with random weights and non-zero biases (the logits' biases too: softmax
    ignores them, so the function, which takes none, must agree anyway)."""
    torch.manual_seed(seed)
    ref = ReferenceACM(channels, groups, variant).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ref


def function_weights(ref):
    """The function's arguments (kq_weight, gate weights) from a ReferenceACM, as leaves that
    share the reference's storage (so gradients can be compared)."""
    kq = None
    if ref.sub_mod is not None:  # interleaved [K_0, Q_0, K_1, Q_1, ...]
        kq = torch.stack([ref.add_mod.map_gen[0].weight, ref.sub_mod.map_gen[0].weight], dim=1)
        kq = kq.reshape(2 * ref.groups, -1, 1, 1)
    elif ref.add_mod is not None:
        kq = ref.add_mod.map_gen[0].weight
    gate = [None] * 4
    if ref.mul_mod is not None:
        f = ref.mul_mod.feature_gen
        gate = [f[0].weight, f[0].bias, f[2].weight, f[2].bias]
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in [kq, *gate]]


def reference_grads(ref):
    """The reference's gradients in the function's argument order."""
    kq = None
    if ref.sub_mod is not None:
        kq = torch.stack([ref.add_mod.map_gen[0].weight.grad, ref.sub_mod.map_gen[0].weight.grad], dim=1)
        kq = kq.reshape(2 * ref.groups, -1, 1, 1)
    elif ref.add_mod is not None:
        kq = ref.add_mod.map_gen[0].weight.grad
    gate = [None] * 4
    if ref.mul_mod is not None:
        f = ref.mul_mod.feature_gen
        gate = [f[0].weight.grad, f[0].bias.grad, f[2].weight.grad, f[2].bias.grad]
    return [kq, *gate]


def run_function(x, weights, groups, variant, upstream, orth_weight):
    x = x.detach().clone().requires_grad_(True)
    for w in weights:
        if w is not None:
            w.grad = None
    y, orth = attend_and_compare(x, *weights, groups, variant)
    loss = (y.double() * upstream).sum()
    if orth is not None:
        loss = loss + (orth.double() * orth_weight).sum()
    loss.backward()
    return y, orth, x.grad, [None if w is None else w.grad for w in weights]


def run_reference(ref, x, upstream, orth_weight):
    ref.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, orth = ref(x)
    loss = (y.double() * upstream).sum()
    if orth is not None:
        loss = loss + (orth.double() * orth_weight).sum()
    loss.backward()
    return y, orth, x.grad, reference_grads(ref)


def rel_error(actual, expected):
    """max |actual - expected| over max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / (expected.double().abs().max() + 1e-30)).item()
