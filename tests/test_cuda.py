"""attend_and_compare on CUDA (skipped without a GPU): the literal equations in float32 and
float64, gradcheck, autocast float16 / bfloat16 against float32, channels_last, and one DDP
step over two GPUs with NCCL.

Run on a GPU machine with: pytest -m cuda tests/test_cuda.py
"""
import os
import socket

import pytest
import torch

from acm_d2.modeling.acm_function import VARIANTS, attend_and_compare
from function_cases import FORMATS, function_weights, make_reference, rel_error, run_function, run_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DEVICE = "cuda"


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_literal_equations_cuda(variant, layout):
    """float32 within 1e-4 (TF32 off) and float64 within 1e-10 of the float64 literal module
    (run on the CPU): Y, orthogonality, grad X and the weights' gradients."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = make_reference(64, 8, variant)
    torch.manual_seed(1)
    x = torch.randn(2, 64, 13, 11, dtype=torch.float64) + 0.5
    upstream = torch.randn(x.shape, dtype=torch.float64)
    orth_weight = torch.randn(2, dtype=torch.float64)
    y_r, orth_r, gx_r, grads_r = run_reference(ref, x, upstream, orth_weight)
    for dtype, bound in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        weights = [None if w is None else w.detach().to(DEVICE, dtype).requires_grad_(True) for w in function_weights(ref)]
        x_d = x.to(DEVICE, dtype).contiguous(memory_format=FORMATS[layout])
        y, orth, gx, grads = run_function(x_d, weights, 8, variant, upstream.to(DEVICE), orth_weight.to(DEVICE))
        assert y.is_cuda and y.dtype == dtype and y.is_contiguous(memory_format=FORMATS[layout])
        assert gx.is_contiguous(memory_format=FORMATS[layout])
        assert rel_error(y.cpu(), y_r) <= bound and rel_error(gx.cpu(), gx_r) <= bound
        if orth_r is not None:
            assert (orth.cpu().double() - orth_r).abs().max().item() <= bound
        for g, g_r in zip(grads, grads_r):
            if g is not None:
                assert rel_error(g.cpu(), g_r) <= bound


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_cuda(variant):
    ref = make_reference(8, 2, variant)
    weights = [w.detach().to(DEVICE).requires_grad_(True) for w in function_weights(ref) if w is not None]
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    has_kq, has_gate = variant != "PX", variant != "X+(K-Q)"

    def run(x, *ws):
        ws = list(ws)
        kq = ws.pop(0) if has_kq else None
        gate = ws if has_gate else [None] * 4
        return tuple(t for t in attend_and_compare(x, kq, *gate, 2, variant) if t is not None)

    assert torch.autograd.gradcheck(run, (x, *weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_realistic_magnitudes(dtype, layout):
    """Autocast with X in float16 / bfloat16 at realistic sizes and magnitudes (200x300 maps,
    values up to 1e3): everything finite; Y and grad X within 1e-2 (float16) or 4e-2
    (bfloat16) of float32 relative to their largest magnitude, the orthogonality term and the
    weights' gradients within 5e-2 (half precision only rounds the logits product and X)."""
    bound = 1e-2 if dtype == torch.float16 else 4e-2
    ref = make_reference(256, 32, "P(X+(K-Q))", dtype=torch.float32)
    weights = [w.detach().to(DEVICE) for w in function_weights(ref)]
    torch.manual_seed(3)
    x32 = (torch.randn(2, 256, 200, 300, device=DEVICE) * 300).clamp_(-1e3, 1e3).contiguous(memory_format=FORMATS[layout])
    upstream = torch.randn(x32.shape, device=DEVICE)

    def run(x, autocast):
        w = [t.clone().requires_grad_(True) for t in weights]
        x = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            y, orth = attend_and_compare(x, *w, 32, "P(X+(K-Q))")
        (y.float() * upstream).sum().add(orth.sum()).backward()
        return y, orth, x.grad, [t.grad for t in w]

    y, orth, gx, grads = run(x32.to(dtype), True)
    y32, orth32, gx32, grads32 = run(x32.to(dtype).float(), False)  # the same (rounded) X in float32
    assert y.dtype == dtype and gx.dtype == dtype and orth.dtype == torch.float32
    for t in (y, orth, gx, *grads):
        assert torch.isfinite(t).all()
    assert rel_error(y, y32) <= bound and rel_error(gx, gx32) <= bound
    assert rel_error(orth, orth32) <= 5e-2
    for g, g32 in zip(grads, grads32):
        assert rel_error(g, g32) <= 5e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist

    from acm_d2 import ACM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    module = ACM(64, groups=8).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[rank])
    torch.manual_seed(rank + 1)
    x = torch.randn(2, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    ddp(x).square().mean().backward()
    results[rank] = torch.cat([p.grad.flatten() for p in module.parameters()]).cpu()
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_nccl_ddp_step():
    """One DDP step on two GPUs: both ranks end with the same, finite, averaged gradients."""
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    context = mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=False)
    for _ in range(120):  # a 120 s timeout
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the DDP step did not finish within 120 s")
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[0], results[1])
