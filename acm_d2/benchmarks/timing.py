"""How every benchmark of :mod:`acm_d2.benchmarks` times and sizes its cases.

Every figure is a ratio of two cases timed interleaved in one run on one device (case 1, 2,
3, 1, 2, 3, ... after a warm-up round; minima over the repeats), so that the load of a
shared machine hits both sides alike. On CUDA the cases are timed with CUDA events after a
synchronisation, and each case's peak ``torch.cuda.max_memory_allocated`` is recorded.
The yardstick of a module is the floor: one ``X * s`` pass (one read and one write of X).
"""
import contextlib
import statistics
import time
from typing import Callable, Dict, List

import torch

__all__ = ["PRECISIONS", "QUICK_STAGES", "STAGES", "autocast", "run_interleaved", "saved_bytes_over_input"]

#: (C, H, W) of X at the ACM places of ResNet-50 for an 800x1216 image.
STAGES = {"res2": (256, 200, 304), "res3": (512, 100, 152), "res4": (1024, 50, 76), "res5": (2048, 25, 38)}
#: Tiny shapes for a smoke test.
QUICK_STAGES = {"tiny3": (64, 12, 19), "tiny5": (128, 7, 9)}
#: The allowed values of a benchmark's ``precision``: the dtype of its autocast region.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, precision: str):
    """``torch.autocast(device.type, dtype)`` for "bfloat16" / "float16"; none for "float32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(PRECISIONS)}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_interleaved(cases: Dict[str, Callable], repeats: int, device: torch.device, warmup: int = 1) -> Dict[str, dict]:
    """Time every case ``repeats`` times, cycling through the cases after ``warmup`` rounds.
    Returns {case: {"min_ms", "median_ms"[, "peak_mib"]}}."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    peaks: Dict[str, float] = {}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed = _time_once(fn, device)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            if round_index >= warmup:
                times[name].append(elapsed)
    out = {name: {"min_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts)} for name, ts in times.items()}
    for name, peak in peaks.items():
        out[name]["peak_mib"] = peak
    return out


def saved_bytes_over_input(fn: Callable, x: torch.Tensor) -> float:
    """Bytes saved for backward by the graph ``fn(x)`` builds (each storage once) over X's bytes."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x)
    return sum(storages.values()) / (x.numel() * x.element_size())

