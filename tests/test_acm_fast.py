"""attend_and_compare (every variant, both memory formats, all its paths) against the literal
ReferenceACM, and the benchmark's smoke test."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from acm_d2.modeling.acm_function import VARIANTS, attend_and_compare, attend_and_compare_ops, maps_per_group
from function_cases import FORMATS, function_weights, make_reference, rel_error, run_function, run_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups, shape", [(1, (2, 16, 5, 7)), (4, (3, 16, 4, 6)), (8, (1, 16, 1, 1))])
def test_matches_literal_equations(variant, layout, groups, shape):
    """float32 against the literal equations in float64 at 1e-5 (values, orthogonality,
    gradients of X and every weight); float64 at 1e-10. Y and grad X keep X's layout."""
    ref = make_reference(shape[1], groups, variant)
    torch.manual_seed(1)
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).contiguous(memory_format=FORMATS[layout])
    upstream = torch.randn(shape, dtype=torch.float64)
    orth_weight = torch.randn(shape[0], dtype=torch.float64)
    y_r, orth_r, gx_r, grads_r = run_reference(ref, x, upstream, orth_weight)
    assert (orth_r is None) == (maps_per_group(variant) < 2)
    for dtype, bound in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        weights = [None if w is None else w.detach().to(dtype).requires_grad_(True) for w in function_weights(ref)]
        y, orth, gx, grads = run_function(x.to(dtype), weights, groups, variant, upstream, orth_weight)
        assert y.dtype == dtype and y.is_contiguous(memory_format=FORMATS[layout])
        assert gx.is_contiguous(memory_format=FORMATS[layout])
        assert rel_error(y, y_r) <= bound
        assert rel_error(gx, gx_r) <= bound
        if orth_r is None:
            assert orth is None
        else:
            assert orth.dtype == dtype and orth.shape == (shape[0],)
            assert (orth.double() - orth_r).abs().max().item() <= bound
        for name, g, g_r in zip(["kq", "w1", "b1", "w2", "b2"], grads, grads_r):
            assert (g is None) == (g_r is None), name
            if g is not None:
                assert rel_error(g, g_r) <= bound, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_paths_agree(variant):
    """The no-grad path, the autograd Function and the plain-ops formulation give the same Y
    and orthogonality, for every batch size and layout."""
    ref = make_reference(32, 8, variant, dtype=torch.float32)
    weights = [None if w is None else w.detach() for w in function_weights(ref)]
    for n in (1, 2, 3):
        for fmt in FORMATS.values():
            x = torch.randn(n, 32, 6, 5).contiguous(memory_format=fmt)
            with torch.no_grad():
                y, orth = attend_and_compare(x, *weights, 8, variant)
            y_ops, orth_ops = attend_and_compare_ops(x, *weights, 8, variant)
            y_fn, orth_fn = attend_and_compare(x.clone().requires_grad_(True), *weights, 8, variant)
            for out in (y, y_ops, y_fn):
                assert out.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(y_fn.detach(), y, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(y_ops, y, atol=1e-5, rtol=1e-5)
            if orth is None:
                assert orth_ops is None and orth_fn is None
            else:
                torch.testing.assert_close(orth_fn.detach(), orth, atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(orth_ops, orth, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(variant, layout):
    """Y and the orthogonality term w.r.t. X and every weight, float64."""
    ref = make_reference(8, 2, variant)
    weights = [w for w in function_weights(ref) if w is not None]
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64).contiguous(memory_format=FORMATS[layout]).requires_grad_(True)
    has_kq, has_gate = maps_per_group(variant) > 0, variant != "X+(K-Q)"

    def run(x, *ws):
        ws = list(ws)
        kq = ws.pop(0) if has_kq else None
        gate = ws if has_gate else [None] * 4
        return tuple(t for t in attend_and_compare(x, kq, *gate, 2, variant) if t is not None)

    assert torch.autograd.gradcheck(run, (x, *weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_close_to_float32(variant):
    """CPU bf16 autocast, X in bf16 (as a conv gives it): Y and grad X stay bf16, the
    orthogonality term and the weights' gradients float32; errors against float64 within 2e-2
    of the magnitude."""
    ref = make_reference(64, 8, variant)
    torch.manual_seed(2)
    x = (torch.randn(2, 64, 7, 9) + 0.5).bfloat16()
    upstream = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    orth_weight = torch.randn(2, dtype=torch.float64)
    y_r, orth_r, gx_r, grads_r = run_reference(ref, x.double(), upstream, orth_weight)
    weights = [None if w is None else w.detach().float().requires_grad_(True) for w in function_weights(ref)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, orth, gx, grads = run_function(x, weights, 8, variant, upstream, orth_weight)
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert rel_error(y, y_r) <= 2e-2 and rel_error(gx, gx_r) <= 2e-2
    if orth is not None:
        assert orth.dtype == torch.float32 and rel_error(orth, orth_r) <= 2e-2
    for g, g_r in zip(grads, grads_r):
        if g is not None:
            assert g.dtype == torch.float32 and rel_error(g, g_r) <= 2e-2


def test_float32_under_autocast_stays_float32():
    ref = make_reference(32, 8, "P(X+(K-Q))", dtype=torch.float32)
    weights = [w.detach() for w in function_weights(ref)]
    x = torch.randn(2, 32, 5, 5)
    expected, _ = attend_and_compare(x, *weights, 8, "P(X+(K-Q))")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = attend_and_compare(x, *weights, 8, "P(X+(K-Q))")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected)


class LargeOutputs(TorchDispatchMode):
    """Records the ops that write a new tensor (not a view) of at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("n", [1, 2])
def test_no_copy_of_x(layout, n):
    """Forward writes one X-sized tensor (Y) in either path; backward saves only X (no copy)
    and small vectors."""
    ref = make_reference(64, 8, "P(X+(K-Q))", dtype=torch.float32)
    weights = [w.detach().requires_grad_(True) for w in function_weights(ref)]
    x = torch.randn(n, 64, 12, 10).contiguous(memory_format=FORMATS[layout])
    for grad in (False, True):
        with torch.set_grad_enabled(grad), LargeOutputs(x.numel()) as mode:
            attend_and_compare(x.requires_grad_(grad), *weights, 8, "P(X+(K-Q))")
        assert mode.ops == ["aten.addcmul.default"], mode.ops
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend_and_compare(x, *weights, 8, "P(X+(K-Q))")
    assert x.untyped_storage().data_ptr() in saved
    assert sum(saved.values()) <= 1.25 * x.numel() * x.element_size()


class Wrapper(torch.nn.Module):
    """A module calling attend_and_compare, for TorchScript / export / compile."""

    def __init__(self, variant):
        super().__init__()
        ref = make_reference(16, 4, variant, dtype=torch.float32)
        kq, w1, b1, w2, b2 = function_weights(ref)
        self.kq = None if kq is None else torch.nn.Parameter(kq.detach())
        self.w1 = None if w1 is None else torch.nn.Parameter(w1.detach())
        self.b1 = None if b1 is None else torch.nn.Parameter(b1.detach())
        self.w2 = None if w2 is None else torch.nn.Parameter(w2.detach())
        self.b2 = None if b2 is None else torch.nn.Parameter(b2.detach())
        self.variant = variant

    def forward(self, x):
        y, orth = attend_and_compare(x, self.kq, self.w1, self.b1, self.w2, self.b2, 4, self.variant)
        return y if orth is None else y + orth.view(-1, 1, 1, 1)


@pytest.mark.parametrize("variant", ["P(X+(K-Q))", "PX"])
def test_script_trace_export_compile(variant):
    module = Wrapper(variant)
    x = torch.randn(2, 16, 6, 7)
    expected = module(x)
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(x), expected)  # the fused forward, compiled
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(scripted(x_last), module(x_last))
    traced = torch.jit.trace(module, (x,))
    assert "bmm" in str(traced.graph) or "mean" in str(traced.graph)  # the fused computation, recorded
    other_size = torch.randn(2, 16, 5, 9)
    torch.testing.assert_close(traced(other_size), module(other_size), atol=1e-5, rtol=1e-5)
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    exported = torch.export.export(module, (x,), dynamic_shapes={"x": {2: h, 3: w}})
    other = torch.randn(2, 16, 9, 4)
    torch.testing.assert_close(exported.module()(other), module(other), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(module, backend="aot_eager")
    xg = x.clone().requires_grad_(True)
    out = compiled(xg)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_bad_arguments():
    x = torch.randn(1, 16, 3, 3)
    with pytest.raises(ValueError, match="unknown ACM variant"):
        attend_and_compare(x, None, None, None, None, None, 4, "K-Q")
    with pytest.raises(ValueError, match=r"needs kq_weight of shape \[8, 4, 1, 1\]"):
        attend_and_compare(x, torch.randn(4, 4, 1, 1), None, None, None, None, 4, "X+(K-Q)")
    with pytest.raises(ValueError, match="takes no kq_weight"):
        attend_and_compare(x, torch.randn(4, 4, 1, 1), torch.randn(8, 4, 1, 1), None, None, None, 4, "PX")


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    """tools/benchmark.py --quick: the table and the JSON, with every ratio."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "infer ops/acm" in printed and "train ref/acm" in printed
    stored = json.loads(out.read_text())
    assert len(stored["module"]) == 4 and "model" not in stored
    for r in stored["module"]:
        assert r["saved_over_x"]["acm"] <= 1.25 and r["saved_over_x"]["ref"] > 2
        assert all(v > 0 for v in r["ratios"].values()) and len(r["ratios"]) == 12
    assert stored["info"]["device"] == "cpu"
    # the peers, every module at each tiny shape: time over the floor in 4 cases, saved bytes
    assert "ACM and its peers" in printed and [r["stage"] for r in stored["peers"]] == ["tiny3", "tiny5"]
    for r in stored["peers"]:
        assert sorted(r["saved_over_x"]) == ["ACM", "CBAM", "CC", "GC", "NL", "SE"]
        assert len(r["over_floor"]) == 6 * 4 and all(v > 0 for v in r["over_floor"].values())
        assert r["saved_over_x"]["NL"] > r["saved_over_x"]["SE"]
