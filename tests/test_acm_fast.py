"""The fused ACM (acm_d2.ACM, an autograd Function) against the literal ReferenceACM."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from acm_d2 import ACM, ReferenceACM
from acm_d2.modeling.acm_function import ACMFunction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pair(channels, groups, dtype=torch.float32, seed=0):
    """A randomized ACM (non-zero biases) and a ReferenceACM with the same weights."""
    torch.manual_seed(seed)
    fast = ACM(channels, groups=groups).to(dtype).train()
    fast.record_orthogonality = True
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = ReferenceACM(channels, groups).to(dtype).train()
    w, b = fast.kq_logits.weight, fast.kq_logits.bias
    state = {
        "add_mod.map_gen.0.weight": w[0::2],  # interleaved [K_0, Q_0, K_1, Q_1, ...]
        "add_mod.map_gen.0.bias": b[0::2],
        "sub_mod.map_gen.0.weight": w[1::2],
        "sub_mod.map_gen.0.bias": b[1::2],
        "mul_mod.feature_gen.0.weight": fast.channel_gate[0].weight,
        "mul_mod.feature_gen.0.bias": fast.channel_gate[0].bias,
        "mul_mod.feature_gen.2.weight": fast.channel_gate[2].weight,
        "mul_mod.feature_gen.2.bias": fast.channel_gate[2].bias,
    }
    ref.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return fast, ref


def fast_grads(fast):
    """The gradients of the fast module in the reference's parameter layout."""
    w, b = fast.kq_logits.weight.grad, fast.kq_logits.bias.grad
    return {
        "add_mod.map_gen.0.weight": w[0::2],
        "add_mod.map_gen.0.bias": b[0::2],
        "sub_mod.map_gen.0.weight": w[1::2],
        "sub_mod.map_gen.0.bias": b[1::2],
        "mul_mod.feature_gen.0.weight": fast.channel_gate[0].weight.grad,
        "mul_mod.feature_gen.0.bias": fast.channel_gate[0].bias.grad,
        "mul_mod.feature_gen.2.weight": fast.channel_gate[2].weight.grad,
        "mul_mod.feature_gen.2.bias": fast.channel_gate[2].bias.grad,
    }


def run_both(fast, ref, x, upstream, orth_weight, x_ref=None):
    """Forward and backward of both modules through Y and the orthogonality term."""
    fast.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    x_fast = x.detach().clone().requires_grad_(True)
    x_ref = (x if x_ref is None else x_ref).detach().clone().requires_grad_(True)
    y_fast = fast(x_fast)
    orth_fast = fast.last_orthogonality
    y_ref, orth_ref = ref(x_ref)
    ((y_fast.float() * upstream).sum() + (orth_fast * orth_weight).sum()).backward()
    ((y_ref.float() * upstream).sum() + (orth_ref * orth_weight).sum()).backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    return (y_fast, orth_fast, x_fast.grad, fast_grads(fast)), (y_ref, orth_ref, x_ref.grad, ref_grads)


def max_rel_error(actual, expected, scale=None):
    """max |actual - expected| over max |expected| (or over ``scale``)."""
    scale = (expected.detach().abs().max().item() if scale is None else scale) + 1e-30
    return (actual.detach().double() - expected.detach().double()).abs().max().item() / scale


def grad_scale(grads, key):
    """The scale to judge a gradient by: its own, or for the logits' biases (whose exact
    gradient is 0: softmax is shift-invariant) that of the matching weights."""
    if key.endswith("map_gen.0.bias"):
        return grads[key.replace(".bias", ".weight")].abs().max().item()
    return grads[key].abs().max().item()


def double_reference(ref):
    return copy.deepcopy(ref).double()


@pytest.mark.parametrize("groups", [1, 8, 32])
@pytest.mark.parametrize("shape", [(3, 64, 7, 9), (1, 64, 1, 1), (1, 64, 5, 4)])
def test_matches_reference_float32(groups, shape):
    """float32 against the reference in float64 (the exact yardstick) at 1e-5, and against the
    reference in float32 at what float32 rounding allows."""
    fast, ref = make_pair(64, groups)
    ref64 = double_reference(ref)
    torch.manual_seed(1)
    x = torch.randn(shape) + 0.5
    upstream = torch.randn(shape)
    orth_weight = torch.randn(shape[0])
    (y, orth, gx, grads), (y_r, orth_r, gx_r, grads_r) = run_both(fast, ref64, x, upstream, orth_weight, x_ref=x.double())
    assert y.shape == x.shape and y.dtype == x.dtype and orth.shape == (shape[0],) and orth.dtype == torch.float32
    torch.testing.assert_close(y, y_r.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(orth, orth_r.float(), atol=1e-5, rtol=1e-5)
    assert max_rel_error(gx, gx_r) <= 1e-5
    for key, grad_r in grads_r.items():
        assert max_rel_error(grads[key], grad_r, grad_scale(grads_r, key)) <= 1e-5, key
    # The float32 reference differs from both by its own rounding only.
    (_, _, gx, grads), (y_r32, _, gx_r32, grads_r32) = run_both(fast, ref, x, upstream, orth_weight)
    torch.testing.assert_close(y, y_r32, atol=1e-5, rtol=1e-5)
    assert max_rel_error(gx, gx_r32) <= 1e-4
    for key, grad_r in grads_r32.items():
        assert max_rel_error(grads[key], grad_r, grad_scale(grads_r32, key)) <= 1e-4, key


def test_matches_reference_float64_exactly():
    fast, ref = make_pair(32, 4, dtype=torch.float64)
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    upstream = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    (y, orth, gx, grads), (y_r, orth_r, gx_r, grads_r) = run_both(fast, ref, x, upstream, torch.randn(2, dtype=torch.float64))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_r, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(orth.double(), orth_r, atol=1e-6, rtol=1e-6)  # last_orthogonality is float32
    assert max_rel_error(gx, gx_r) <= 1e-6
    for key, grad_r in grads_r.items():
        assert max_rel_error(grads[key], grad_r, grad_scale(grads_r, key)) <= 1e-6, key


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_bf16_autocast_close_to_float32(groups):
    """Under CPU bf16 autocast (X in bf16, as a conv would give it): Y and grad X stay bf16,
    the orthogonality term and parameter gradients float32, and their errors against the
    float64 reference are bf16-sized: at most 2e-2 of the magnitude, or 3 times the error of the
    literal reference run under the same autocast (groups=1 has logits large enough for bf16
    rounding of the logits product, which both do, to matter)."""
    fast, ref = make_pair(64, groups)
    ref64 = double_reference(ref)
    torch.manual_seed(2)
    x = (torch.randn(3, 64, 7, 9) + 0.5).bfloat16()
    upstream = torch.randn(3, 64, 7, 9)
    orth_weight = torch.randn(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y, orth, gx, grads), (y_a, orth_a, gx_a, grads_a) = run_both(fast, ref, x, upstream, orth_weight)
    assert y.dtype == torch.bfloat16 and orth.dtype == torch.float32 and gx.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())
    _, (y_r, orth_r, gx_r, grads_r) = run_both(
        fast, ref64, x, upstream.double(), orth_weight.double(), x_ref=x.double()
    )

    def check(name, actual, literal, exact, scale=None):
        error = max_rel_error(actual, exact, scale)
        bound = max(2e-2, 3 * max_rel_error(literal, exact, scale))
        assert error <= bound, f"{name}: error {error:.3g} > {bound:.3g}"

    check("Y", y, y_a, y_r)
    check("orthogonality", orth, orth_a, orth_r)
    check("grad x", gx, gx_a, gx_r)
    for key, grad_r in grads_r.items():
        check(key, grads[key], grads_a[key], grad_r, grad_scale(grads_r, key))


def test_float32_input_under_autocast_stays_float32():
    fast, _ = make_pair(32, 8)
    x = torch.randn(2, 32, 5, 5)
    expected = fast(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected)


def test_inference_path_and_layouts_match_training_path():
    fast, ref = make_pair(64, 8)
    x = torch.randn(2, 64, 9, 7)
    y_train = fast(x.clone().requires_grad_(True))
    with torch.no_grad():
        y_eval = fast.eval()(x)
        y_cl = fast(x.to(memory_format=torch.channels_last))
        y_ref, _ = ref(x)
    torch.testing.assert_close(y_eval, y_train.detach())
    torch.testing.assert_close(y_cl, y_eval)
    torch.testing.assert_close(y_eval, y_ref, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), y_eval)


def test_gradcheck_float64_function():
    """Y and the orthogonality term, w.r.t. X and every parameter, in float64."""
    fast, _ = make_pair(8, 2, dtype=torch.float64)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = tuple(p.detach().clone().requires_grad_(True) for p in fast._weights())
    with torch.no_grad():
        for p in weights:
            p.add_(torch.randn_like(p) * 0.3)
    assert torch.autograd.gradcheck(lambda x, *w: ACMFunction.apply(x, *w, 2), (x, *weights), eps=1e-6, atol=1e-6)


def test_gradcheck_float64_module():
    """The module (functional_call), through Y and last_orthogonality, groups 1, 1x1 and odd sizes."""
    for groups, shape in ((1, (1, 8, 1, 1)), (2, (2, 8, 3, 1)), (4, (1, 8, 3, 5))):
        fast, _ = make_pair(8, groups, dtype=torch.float64)
        names = [name for name, _ in fast.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for _, p in fast.named_parameters())
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

        def run(x, *ps):
            y = torch.func.functional_call(fast, dict(zip(names, ps)), (x,))
            return y, fast.last_orthogonality.double() * 0 + orth_double(x, ps, names, fast)

        assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def orth_double(x, ps, names, module):
    """The orthogonality term in float64 from the Function itself (last_orthogonality is float32)."""
    weights = dict(zip(names, ps))
    return ACMFunction.apply(
        x,
        weights["kq_logits.weight"],
        weights["kq_logits.bias"],
        weights["channel_gate.0.weight"],
        weights["channel_gate.0.bias"],
        weights["channel_gate.2.weight"],
        weights["channel_gate.2.bias"],
        module.groups,
    )[1]


def saved_bytes(fn):
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(storages.values()), out


def test_saved_for_backward_is_about_x():
    fast, ref = make_pair(512, 32)
    x = torch.randn(2, 512, 20, 30, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    fast_bytes, y = saved_bytes(lambda: fast(x))
    assert fast_bytes <= 1.1 * x_bytes, fast_bytes / x_bytes
    ref_bytes, _ = saved_bytes(lambda: ref(x))
    assert ref_bytes > 2 * x_bytes  # the literal equations keep X - mu and X + K - Q too
    y.sum().backward()  # the graph is usable
    assert x.grad is not None and x.grad.shape == x.shape


def test_benchmark_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "floor" in proc.stdout and "saved a/X" in proc.stdout
    results = json.loads(out.read_text())
    assert len(results["module"]) == 2 and "model" not in results
    for r in results["module"]:
        assert r["acm_saved_ratio"] <= 1.2 and r["ref_saved_ratio"] > 2
        assert set(r["times"]) == {"floor_fwd", "acm_fwd", "ref_fwd", "floor_fwdbwd", "acm_fwdbwd", "ref_fwdbwd"}
