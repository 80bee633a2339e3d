"""Training runs through ``tools/train_net.py`` in a subprocess, and their COCO metrics."""
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

__all__ = ["QUICK_OPTS", "REPO", "ap_table", "format_ap_table", "read_final_metrics", "run_train_net"]

logger = logging.getLogger(__name__)

#: The checkout this package is installed from (``pip install -e .``), whose tools/ is run.
REPO = Path(__file__).resolve().parents[2]

#: Overrides for smoke runs: the tiny dataset (64 px, 16/8 images) and a handful of iterations.
QUICK_OPTS = [
    "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)",
    "DATASETS.TEST", "('acm_synthetic_tiny_val',)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "()",
    "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "0",
]


def run_train_net(config_file, opts: Sequence[str], output_dir, threads: Optional[int] = None,
                  log_path: Optional[Path] = None) -> Dict[str, float]:
    """Train and evaluate with tools/train_net.py in a subprocess; return its final metrics.

    ``opts``: ``KEY VALUE`` overrides. ``threads`` sets OMP_NUM_THREADS for the child (1 is much
    faster than 2 on a busy 2-core machine). With ``log_path`` the child's output goes there,
    else to this process's. Returns the last evaluation of metrics.json (``bbox/AP``,
    ``segm/AP-square``, ...). Raises RuntimeError if the run fails.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config_file)]
    cmd += [str(o) for o in opts] + ["OUTPUT_DIR", str(output_dir)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    logger.info("Running: %s", " ".join(cmd))
    if log_path is not None:
        with open(log_path, "w") as log:
            code = subprocess.call(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    else:
        code = subprocess.call(cmd, env=env, cwd=str(REPO))
    if code != 0:
        where = f" (see {log_path})" if log_path is not None else ""
        raise RuntimeError(f"tools/train_net.py failed with exit code {code}{where}: {' '.join(cmd)}")
    return read_final_metrics(output_dir)


def read_final_metrics(output_dir) -> Dict[str, float]:
    """The ``bbox/*`` and ``segm/*`` values of the last evaluation in ``output_dir/metrics.json``."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        raise RuntimeError(f"{path} not found: did the training finish?")
    found = None
    with open(path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                if "bbox/AP" in entry:
                    found = entry
    if found is None:
        raise RuntimeError(f"{path} holds no evaluation results (bbox/AP)")
    return {k: v for k, v in found.items() if k.startswith(("bbox/", "segm/"))}


def ap_table(metrics: Dict[str, float], classes: Sequence[str]) -> Dict:
    """{"bbox": {"AP", "AP50", "AP75", "per_category": {class: AP}}, "segm": {...}}."""
    out = {}
    for task in ("bbox", "segm"):
        if f"{task}/AP" in metrics:
            out[task] = {k: metrics.get(f"{task}/{k}", math.nan) for k in ("AP", "AP50", "AP75")}
            out[task]["per_category"] = {c: metrics.get(f"{task}/AP-{c}", math.nan) for c in classes}
    return out


def format_ap_table(aps: Dict) -> str:
    lines = []
    for task, name in (("bbox", "AP box"), ("segm", "AP mask")):
        if task in aps:
            r = aps[task]
            lines.append(f"{name}: {r['AP']:.2f}  (AP50 {r['AP50']:.2f}, AP75 {r['AP75']:.2f})")
            lines += [f"    {cls:<18s} {v:6.2f}" for cls, v in r["per_category"].items()]
    return "\n".join(lines)
