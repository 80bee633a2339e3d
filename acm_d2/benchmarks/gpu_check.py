"""The GPU check: one command that spends a GPU machine's few minutes on what matters most.

``python tools/gpu_check.py [--device cuda|cpu] [--quick] [--budget-s S] [--output-dir DIR]``
(``make gpu-check`` sets up the venv first) runs these parts, most important first, and writes
``DIR/gpu_check.json`` (a key per part, each with its ``status``: "done", "skipped" or
"failed", and ``reason`` where not done) and ``DIR/gpu_check.md``; each part's output goes to
``DIR/logs/<part>.log``:

* ``device``: the card, its driver, torch's build (CUDA, cuDNN, the architectures it has
  kernels for), Python, Detectron2; always measured (it takes no time);
* ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py``, pass / fail / skip per test;
* ``model``: Mask R-CNN R-50-FPN at the COCO training size (800x1216, batch 2 per GPU):
  backbone inference and a training step of the plain model, ACM and each peer, in float32
  and in AMP (float16 on CUDA as Detectron2's ``SOLVER.AMP``; bfloat16 on the CPU), as
  ratios over the plain model of the same run, with each case's peak memory
  (:func:`acm_d2.benchmarks.peers.bench_peer_models`);
* ``module``: ACM and every peer at the R-50 stage shapes of an 800x1216 batch of 2, where
  their papers put them, in float32 and under bfloat16 / float16 autocast, contiguous and
  channels_last, inference and forward + backward, over the floor (one ``X * s`` pass), with
  peak memory; whether Y and dL/dX stay finite under autocast at a realistic magnitude of X,
  and how far they are from float32; NL's and CC's memory at the COCO size;
* ``demo``: the first iterations' losses of the demo's training on the device against the
  CPU at the same seed (:mod:`acm_d2.benchmarks.loss_curve`), then ``tools/demo.py`` on the
  device with its AP, shortened (fewer iterations) where the budget needs it.

The wall-clock budget (``--budget-s``, default 8 minutes) is enforced here: a part whose
estimate exceeds what is left is skipped with a line saying so, and every part but
``device`` runs in a child process stopped when the budget runs out. ``--quick`` runs the
same parts at tiny sizes (on the CPU: a test of this command).
"""
import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["PARTS", "main", "parse_args", "run_check"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "COCO-InstanceSegmentation"
DEMO_CONFIG = REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm.yaml"

#: The parts, most important first.
PARTS = ("device", "cuda_tests", "model", "module", "demo")
#: Seconds each part is expected to take at least ({"full": ..., "quick": ...}): a part is
#: skipped when less than this is left of the budget (the demo is shortened to fit above it).
ESTIMATED_S = {
    "cuda_tests": {"full": 60, "quick": 30},
    "model": {"full": 120, "quick": 60},
    "module": {"full": 90, "quick": 20},
    "demo": {"full": 90, "quick": 60},
}
#: The COCO training size of the model part (short side 800, the long side of a 4:3 image
#: rounded to 32) and of the module part's stage shapes (acm_d2.benchmarks.timing.STAGES).
COCO_SIZE = (800, 1216)
#: Relative difference up to which the device's losses count as the CPU's.
LOSS_TOLERANCE = 1e-3
#: Iterations of the loss-curve comparison.
LOSS_ITERATIONS = {"full": 5, "quick": 3}
#: Seconds of a demo not spent training (data, model building, evaluation, pictures).
DEMO_OVERHEAD_S = {"full": 45, "quick": 30}


def _mode(quick: bool) -> str:
    return "quick" if quick else "full"


# ---------------------------------------------------------------------------------------------
# The parts: each returns a JSON-able dict (its status is set by the runner).


def device_part(device: torch.device) -> dict:
    """What the check ran on: the card and its driver, torch's build, the software versions."""
    info = {
        "requested_device": str(device), "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_cuda_arch_list": torch.cuda.get_arch_list() if torch.version.cuda else [],
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import detectron2

        info["detectron2"] = detectron2.__version__
    except ImportError as error:
        info["detectron2"] = f"not importable: {error}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
            info["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def cuda_tests_part(output_dir: Path) -> dict:
    """``pytest -m cuda tests/test_cuda.py`` in a child process: the outcome of every test."""
    with tempfile.TemporaryDirectory(prefix="acm_d2_cuda_tests_") as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
                   f"--junitxml={report}", str(REPO / "tests" / "test_cuda.py")]
        proc = subprocess.run(command, cwd=str(REPO), capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-20000:] + proc.stderr[-5000:])
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report (exit code {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        tests = {}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name')}"
            outcome, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                element = case.find(tag)
                if element is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    detail = (element.get("message") or "")[:300]
            tests[name] = {"outcome": outcome, "seconds": float(case.get("time", 0.0)), "detail": detail}
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in ("passed", "failed", "error", "skipped")}
    return {"command": "pytest -m cuda tests/test_cuda.py", "exit_code": proc.returncode, "counts": counts, "tests": tests}


def model_part(device: torch.device, quick: bool) -> dict:
    """Mask R-CNN R-50-FPN, plain vs ACM vs each peer, float32 and AMP (see the module docstring)."""
    from .peers import bench_peer_models, build_peer_models

    # quick: the numbers mean nothing (tiny sizes, no warm-up round); the code runs
    size, repeats, rois, warmup = ((64, 96), 1, 8, 0) if quick else (COCO_SIZE, 3, 32, 1)
    amp = "float16" if device.type == "cuda" else "bfloat16"
    models = build_peer_models(str(CONFIGS), device, rois)
    results = {}
    for precision in ("float32", amp):
        results[precision] = bench_peer_models(str(CONFIGS), device, size, 2, repeats, rois, precision, models, warmup)
        _release(device)
    return {"size": list(size), "batch": 2, "repeats": repeats, "warmup": warmup, "amp_precision": amp, "precisions": results}


def module_part(device: torch.device, quick: bool) -> dict:
    """ACM and every peer at the stage shapes, three precisions, and their errors under autocast."""
    from .peers import attention_memory_scaling, bench_peer_modules, precision_errors
    from .timing import QUICK_STAGES, STAGES

    stages = QUICK_STAGES if quick else STAGES
    repeats, warmup = (1, 0) if quick else (3, 1)
    precisions = ("float32", "bfloat16", "float16")
    timed = {}
    for precision in precisions:
        timed[precision] = bench_peer_modules(stages, 2, repeats, device, precision, warmup)
        _release(device)
    error_stages = stages if quick else {k: v for k, v in STAGES.items() if k != "res2"}
    errors = {p: precision_errors(error_stages, 2, device, p) for p in precisions[1:]}
    memory = attention_memory_scaling(device, sides=(64,) if quick else (COCO_SIZE[0],))
    return {"batch": 2, "repeats": repeats, "warmup": warmup, "stages": {k: list(v) for k, v in stages.items()}, "timed": timed,
            "autocast_errors": errors, "attention_memory": memory}


def demo_part(device: torch.device, quick: bool, seconds_left: float) -> dict:
    """The loss curve of the demo's training on the device against the CPU's, then the demo
    on the device with as many of its iterations as ``seconds_left`` allows."""
    from ..config import get_acm_cfg
    from ..data import ensure_synthetic_dataset
    from ..experiments.runs import QUICK_OPTS
    from .loss_curve import compare_losses, train_losses

    start = time.perf_counter()
    opts = (list(QUICK_OPTS) if quick else []) + ["SEED", "0"]
    cfg = get_acm_cfg(str(DEMO_CONFIG), opts)
    ensure_synthetic_dataset(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    iterations = LOSS_ITERATIONS[_mode(quick)]
    on_cpu = train_losses(str(DEMO_CONFIG), opts, "cpu", iterations)
    on_device = train_losses(str(DEMO_CONFIG), opts, str(device), iterations)
    result = {"loss_curve": {"reference_device": "cpu", "device": str(device), "iterations": iterations,
                             "cpu_losses": on_cpu["losses"], "device_losses": on_device["losses"],
                             **compare_losses(on_cpu["losses"], on_device["losses"], LOSS_TOLERANCE)}}

    full_iterations = cfg.SOLVER.MAX_ITER
    per_iter = on_device["seconds_per_iter"] or 1.0
    left = seconds_left - (time.perf_counter() - start) - DEMO_OVERHEAD_S[_mode(quick)]
    demo_iterations = min(full_iterations, int(0.8 * left / per_iter))
    if demo_iterations < min(full_iterations, 20):
        result["demo"] = {"status": "skipped", "reason": f"{left:.0f} s left after the loss curve: too few for 20 iterations "
                                                          f"at {per_iter:.2f} s each"}
        return result
    with tempfile.TemporaryDirectory(prefix="acm_d2_demo_") as out:
        command = [sys.executable, str(REPO / "tools" / "demo.py"), "--device", str(device), "--output-dir", out]
        command += ["--quick"] if quick else []
        if demo_iterations < full_iterations:
            steps = [s for s in cfg.SOLVER.STEPS if s < demo_iterations]
            command += ["SOLVER.MAX_ITER", str(demo_iterations), "SOLVER.STEPS", str(tuple(steps))]
        demo_start = time.perf_counter()
        code = subprocess.call(command, cwd=str(REPO))
        seconds = time.perf_counter() - demo_start
        if code != 0:
            raise RuntimeError(f"tools/demo.py failed with exit code {code}: {' '.join(command)}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    result["demo"] = {
        "status": "done", "command": " ".join(command[1:]).replace(out, "TMP"), "iterations": demo_iterations,
        "full_iterations": full_iterations, "shortened": demo_iterations < full_iterations, "seconds": round(seconds, 1),
        "ap_box": summary["ap"]["bbox"]["AP"], "ap_mask": summary["ap"]["segm"]["AP"], "ap": summary["ap"],
    }
    return result


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The runner.


def _run_part_here(args) -> dict:
    """Run ``args.part`` in this process (the child of :func:`run_part`)."""
    device = torch.device(args.device)
    if args.part == "cuda_tests":
        return cuda_tests_part(Path(args.output_dir))
    if args.part == "model":
        return model_part(device, args.quick)
    if args.part == "module":
        return module_part(device, args.quick)
    if args.part == "demo":
        return demo_part(device, args.quick, args.budget_s)
    raise ValueError(f"--part {args.part!r}: expected one of {list(PARTS[1:])}")


def run_part(part: str, device: str, quick: bool, output_dir: Path, timeout_s: float) -> dict:
    """Run one part in a child process that is stopped after ``timeout_s`` seconds; its output
    goes to ``output_dir/logs/<part>.log``. Returns the part's result with its status."""
    log_path = output_dir / "logs" / f"{part}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acm_d2_gpu_check_") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "acm_d2.benchmarks.gpu_check", "--part", part, "--device", device,
                   "--output-dir", str(output_dir), "--budget-s", str(int(timeout_s)), "--result", str(result_path)]
        command += ["--quick"] if quick else []
        start = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=max(timeout_s, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                return {"status": "failed", "seconds": round(time.perf_counter() - start, 1),
                        "reason": f"stopped at the end of the budget after {timeout_s:.0f} s (see logs/{part}.log)"}
        seconds = round(time.perf_counter() - start, 1)
        if code != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return {"status": "failed", "seconds": seconds,
                    "reason": f"exit code {code} (see logs/{part}.log): {tail[0][:300]}"}
        result = json.loads(result_path.read_text())
    return {"status": "done", "seconds": seconds, **result}


def run_check(device: str, quick: bool, budget_s: float, output_dir: Path, parts=PARTS) -> dict:
    """Every part of ``parts`` in the order of :data:`PARTS`, inside ``budget_s`` seconds;
    writes and returns the report (see the module docstring)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--parts {','.join(unknown)}: expected names among {','.join(PARTS)}")
    if budget_s <= 0:
        raise ValueError(f"--budget-s {budget_s}: expected a positive number of seconds")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device}: torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda}); "
            f"run on a GPU machine, or use --device cpu"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mode = _mode(quick)
    report = {"command": "python tools/gpu_check.py " + f"--device {device} --budget-s {budget_s:g}" + (" --quick" if quick else ""),
              "budget_s": budget_s, "quick": quick}
    for part in PARTS:
        if part not in parts:
            report[part] = {"status": "skipped", "reason": "not among --parts"}
            continue
        if part == "device":
            report[part] = {"status": "done", **device_part(torch_device)}
            continue
        left = budget_s - (time.perf_counter() - start)
        if left < ESTIMATED_S[part][mode]:
            report[part] = {"status": "skipped", "reason": f"{left:.0f} s left of the {budget_s:g} s budget, "
                                                            f"the part needs about {ESTIMATED_S[part][mode]} s"}
        else:
            logger.info("gpu check: %s (%.0f s left)", part, left)
            report[part] = run_part(part, device, quick, output_dir, left)
        logger.info("gpu check: %s %s", part, report[part]["status"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["goals"] = goals(report)
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (output_dir / "gpu_check.md").write_text(render_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------
# The report.


def goals(report: dict) -> List[dict]:
    """The goals of docs/benchmark.md ("On a GPU"), each with its measured value and whether it holds."""
    rows = []
    model = report.get("model", {})
    if model.get("status") == "done":
        for precision, r in model["precisions"].items():
            overhead = r["over_plain"]["ACM"]["training"] - 1
            rows.append({"goal": f"ACM training-step overhead over plain, {precision}", "target": "<= +3%",
                         "value": f"{100 * overhead:+.1f}%", "met": overhead <= 0.03})
    module = report.get("module", {})
    if module.get("status") == "done":
        for r in module["timed"]["float32"]:
            if r["stage"] in ("res3", "res4", "res5") or not r["stage"].startswith("res"):
                worst = max(r["over_floor"][f"ACM_train_{layout}"] for layout in ("contiguous", "channels_last"))
                rows.append({"goal": f"ACM forward+backward over the floor at {r['stage']}, float32",
                             "target": "<= 1.5x", "value": f"{worst:.2f}x", "met": worst <= 1.5})
        bad = [f"{e['module']} at {e['stage']}" for e in module["autocast_errors"].get("float16", []) if not e["finite"]]
        rows.append({"goal": "finite Y and dL/dX under float16 autocast (X ~ N(0, 8^2))", "target": "every module",
                     "value": "all finite" if not bad else "non-finite: " + ", ".join(bad), "met": not bad})
    return rows


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _status_line(name: str, part: dict) -> str:
    seconds = f", {part['seconds']:.0f} s" if "seconds" in part else ""
    return f"**{name}**: {part['status']}{seconds}" + (f" ({part['reason']})" if part.get("reason") else "")


def _peak(times: dict, case: str) -> str:
    return f"{times[case]['peak_mib']:.0f}" if "peak_mib" in times.get(case, {}) else "-"


def render_markdown(report: dict) -> str:
    """``gpu_check.md``: every part's status and figures, and the goals."""
    d = report["device"]
    lines = ["# acm-d2 GPU check", "", f"`{report['command']}`: {report['seconds']:.0f} s of a {report['budget_s']:g} s budget.", ""]
    if d["status"] == "done":
        lines += [f"Device: {d.get('name')} (capability {d.get('capability', '-')}, {d.get('memory_gib', '-')} GiB), "
                  f"driver {d.get('driver', '-')}; torch {d['torch']} (CUDA {d['torch_cuda']}, cuDNN {d['cudnn']}, "
                  f"kernels for {', '.join(d['torch_cuda_arch_list']) or 'no GPU'}); Detectron2 {d['detectron2']}; "
                  f"Python {d['python']}.", ""]
    lines += ["## Parts", ""] + [f"* {_status_line(p, report[p])}" for p in PARTS] + [""]
    if report["goals"]:
        lines += ["## Goals", ""] + _table(["goal", "target", "measured", "met"],
                                           [[g["goal"], g["target"], g["value"], "yes" if g["met"] else "**no**"] for g in report["goals"]])
        lines.append("")
    t = report["cuda_tests"]
    if t["status"] == "done":
        lines += ["## CUDA tests", "", f"`{t['command']}`: " + ", ".join(f"{n} {o}" for o, n in t["counts"].items() if n), ""]
        lines += _table(["test", "outcome", "s", "detail"], [[n, r["outcome"], f"{r['seconds']:.1f}", r["detail"][:120]]
                                                              for n, r in t["tests"].items() if r["outcome"] != "passed"])
        lines.append("")
    m = report["model"]
    if m["status"] == "done":
        lines += [f"## Mask R-CNN R-50-FPN, batch {m['batch']}, {m['size'][0]}x{m['size'][1]}: time and peak memory over plain", ""]
        rows = []
        for precision, r in m["precisions"].items():
            for name, o in r["over_plain"].items():
                mem = (f"{r['training'][name]['peak_mib'] / r['training']['plain']['peak_mib']:.3f}"
                       if "peak_mib" in r["training"][name] else "-")
                rows.append([precision, name, f"{o['inference']:.4f}", f"{o['training']:.4f}", mem, f"{o['parameters'] / 1e6:.2f} M"])
        lines += _table(["precision", "module", "backbone inference", "training step", "training peak memory", "parameters added"], rows)
        plain = ", ".join(f"{p}: inference {r['inference']['plain']['min_ms']:.1f} ms, training {r['training']['plain']['min_ms']:.1f} ms"
                          + (f", peak {r['training']['plain']['peak_mib']:.0f} MiB" if "peak_mib" in r["training"]["plain"] else "")
                          for p, r in m["precisions"].items())
        lines += ["", f"Plain model: {plain}.", ""]
    mod = report["module"]
    if mod["status"] == "done":
        lines += [f"## One module, batch {mod['batch']}: time over the floor (X * s), peak MiB of forward+backward", ""]
        rows = []
        for precision, results in mod["timed"].items():
            for r in results:
                for name in r["saved_over_x"]:
                    f = r["over_floor"]
                    rows.append([precision, r["stage"], name] + [f"{f[f'{name}_{k}']:.2f}" for k in (
                        "infer_contiguous", "infer_channels_last", "train_contiguous", "train_channels_last")]
                        + [_peak(r["times"], f"{name}_train_contiguous")])
        lines += _table(["precision", "stage", "module", "infer", "infer cl", "train", "train cl", "peak MiB train"], rows)
        lines += ["", "Under autocast against float32 (X ~ N(0, 8^2); largest error over the largest float32 magnitude):", ""]
        rows = [[p, e["stage"], e["module"], "yes" if e["finite"] else "**no**", f"{e['output_error']:.2e}", f"{e['grad_error']:.2e}"]
                for p, errors in mod["autocast_errors"].items() for e in errors]
        lines += _table(["precision", "stage", "module", "finite", "Y error", "dL/dX error"], rows)
        lines += ["", "NL and CC at res4, batch 1, saved for backward: " + "; ".join(
            f"{row['input'][0]}x{row['input'][1]}: NL {row['NL_saved_mib']:.0f} MiB, CC {row['CC_saved_mib']:.0f} MiB"
            for row in mod["attention_memory"]) + ".", ""]
    demo = report["demo"]
    if demo["status"] == "done":
        c = demo["loss_curve"]
        lines += ["## Demo", "", f"Losses of the first {c['iterations']} iterations, {c['device']} against {c['reference_device']} "
                  f"(seed 0, every anchor and proposal sampled, TF32 off): {c['matching_iterations']} of {c['iterations']} "
                  f"agree within {c['tolerance']:g} (largest relative difference per iteration: "
                  + ", ".join(f"{v:.1e}" for v in c["max_relative_difference"]) + ").", ""]
        run = demo["demo"]
        if run["status"] == "done":
            short = f", shortened to {run['iterations']} of {run['full_iterations']} iterations" if run["shortened"] else ""
            lines += [f"`{run['command']}`{short}: AP box {run['ap_box']:.2f}, AP mask {run['ap_mask']:.2f} in {run['seconds']:.0f} s.", ""]
        else:
            lines += [f"The demo itself: skipped ({run['reason']}).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line (tools/gpu_check.py).


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test of this command)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    parser.add_argument("--output-dir", default=str(REPO / "output" / "gpu_check"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # the child of run_part
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    if args.part is not None:
        result = _run_part_here(args)
        Path(args.result).write_text(json.dumps(result))
        return None
    report = run_check(args.device, args.quick, args.budget_s, Path(args.output_dir), tuple(p for p in args.parts.split(",") if p))
    logger.info("wrote %s and gpu_check.md", Path(args.output_dir) / "gpu_check.json")
    return report


if __name__ == "__main__":
    main()
