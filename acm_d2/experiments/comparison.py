"""Backbones compared on equal terms: plain vs ACM vs its peers, ACM with parts left out, on
several backbones and seeds; the paper's Table 6 on any data.

Each variant is one config with the overrides of :data:`VARIANTS` (``MODEL.ACM.MODULE`` "none"
is the plain ResNet through the same code; "SE", "NL", "CC", "GC", "CBAM" the peers, each
placed as its paper places it; ``MODEL.ACM.VARIANT`` the paper's Table 2a ablation). The
runs (backbone x variant x seed) are those of :mod:`acm_d2.experiments.grid`: local
processes or SLURM jobs, finished ones reused. Measured per run: the COCO metrics, for ACM
with K and Q the mean |cosine(K, Q)| over the validation images and modules (the paper:
0.1113 with lambda 0, 0.0394 with lambda 0.1), and on the built-in data the label accuracy
on the context categories; per model: parameters, FLOPs and the inference time per image.
:func:`run_comparison` writes ``comparison.md``, ``comparison.png`` and ``comparison.json``
(:mod:`acm_d2.experiments.report`).
"""
import json
import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

from .grid import GridLock, GridRun, SlurmSettings, code_version, plan, run_grid, run_identity
from .report import summarize, write_chart, write_markdown

__all__ = ["VARIANTS", "context_label_accuracy", "mean_abs_kq_cosine", "model_costs", "run_comparison"]

logger = logging.getLogger(__name__)

#: Variant name -> config overrides. "plain" keeps the ResNet without a context module.
VARIANTS = {
    "plain": ["MODEL.ACM.MODULE", "none", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    "SE": ["MODEL.ACM.MODULE", "SE", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    # The other peers (docs/peers.md), each placed as its paper places it for Mask R-CNN.
    "NL": ["MODEL.ACM.MODULE", "NL", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    "CC": ["MODEL.ACM.MODULE", "CC", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    "GC": ["MODEL.ACM.MODULE", "GC", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    "CBAM": ["MODEL.ACM.MODULE", "CBAM", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    "ACM": ["MODEL.ACM.MODULE", "ACM"],
    # The paper's Table 2a: ACM with parts left out (the config's lambda where K and Q exist).
    "X+(K-Q)": ["MODEL.ACM.MODULE", "ACM", "MODEL.ACM.VARIANT", "X+(K-Q)"],
    "P(X+K)": ["MODEL.ACM.MODULE", "ACM", "MODEL.ACM.VARIANT", "P(X+K)", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    "PX": ["MODEL.ACM.MODULE", "ACM", "MODEL.ACM.VARIANT", "PX", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
    # The paper's lambda ablation: the full module without the orthogonality loss.
    "ACM lambda=0": ["MODEL.ACM.MODULE", "ACM", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"],
}


def mean_abs_kq_cosine(config_file, opts: Sequence[str], max_images: int = 150) -> float:
    """Mean over the first ``max_images`` validation images and over the ACM modules of
    |cosine(K, Q)|, with the weights of MODEL.WEIGHTS in ``opts``, on the CPU."""
    import numpy as np

    from ..config import load_model_for_inference
    from ..visualization import attention_on_image, dataset_images

    loaded = load_model_for_inference(str(config_file), list(opts), device="cpu")
    values = []
    for _, image, _ in dataset_images(loaded.test_datasets, max_images):
        attention = attention_on_image(loaded.model, image, loaded.augmentation, loaded.input_format)
        values += [abs(v) for v in attention.cosine.values()]
    return float(np.mean(values)) * 100.0  # in %, like the AP columns


def _iou_xywh(a, b):
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def context_label_accuracy(results_json, gt_json, context_classes, iou=0.5):
    """Percent of ground-truth objects of ``context_classes`` whose best-scoring detection
    among those classes (box IoU >= ``iou``) carries the right class; a missed object counts
    as wrong. It isolates the decision ACM is for: which of the look-alike labels is right."""
    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        dets = json.load(f)
    ids = {c["id"] for c in gt["categories"] if c["name"] in set(context_classes)}
    by_image = {}
    for d in dets:
        if d["category_id"] in ids:
            by_image.setdefault(d["image_id"], []).append(d)
    total = correct = 0
    for ann in gt["annotations"]:
        if ann["category_id"] not in ids:
            continue
        total += 1
        matches = [d for d in by_image.get(ann["image_id"], []) if _iou_xywh(d["bbox"], ann["bbox"]) >= iou]
        if matches and max(matches, key=lambda d: d["score"])["category_id"] == ann["category_id"]:
            correct += 1
    return 100.0 * correct / total if total else math.nan


def _kq_similarity(config_file: str):
    """What a finished run adds to its metrics, once: for ACM with K and Q, the mean |cos(K, Q)|."""

    def measure(run: GridRun) -> Dict[str, float]:
        settings = dict(zip(run.opts[::2], run.opts[1::2]))  # a later override wins, as in the config
        if settings.get("MODEL.ACM.MODULE") == "ACM" and settings.get("MODEL.ACM.VARIANT", "P(X+(K-Q))") in ("P(X+(K-Q))", "X+(K-Q)"):
            weights = ["MODEL.WEIGHTS", str(run.run_dir / "model_final.pth")]
            return {"kq/mean_abs_cosine": mean_abs_kq_cosine(config_file, run.opts + weights)}
        return {}

    return measure


def _add_run_files(results: Sequence[dict], runs: Sequence[GridRun], gt_json: Optional[str], context_classes) -> None:
    """Add to each finished run's metrics what its files hold: the label accuracy on the
    context categories (its saved COCO detections) and the inference time per image (log.txt)."""
    folders = {(r.backbone, r.variant, r.seed): r.run_dir for r in runs}
    for result in results:
        run_dir = folders.get((result.get("backbone"), result["variant"], result["seed"]))
        if run_dir is None:
            continue
        detections = run_dir / "inference" / "coco_instances_results.json"
        if context_classes and gt_json and detections.is_file():
            result["metrics"]["context/label_acc"] = context_label_accuracy(detections, gt_json, context_classes)
        seconds = inference_seconds_per_image(run_dir / "log.txt")
        if seconds is not None:
            result["metrics"]["time/inference_s_per_image"] = seconds


def inference_seconds_per_image(log_txt) -> Optional[float]:
    """The last "Total inference pure compute time: ... (X s / iter per device, ...)" of a
    Detectron2 log (one image per iteration in evaluation), or None."""
    import re

    found = None
    try:
        with open(log_txt, errors="replace") as f:
            for line in f:
                match = re.search(r"Total inference pure compute time: \S+ \(([0-9.]+) s / iter per device", line)
                if match:
                    found = float(match.group(1))
    except OSError:
        return None
    return found


def model_costs(config_file: str, opts: Sequence[str]) -> Dict[str, float]:
    """Parameters (millions: the whole model, and its context modules) and GFLOPs of one test
    image (the first of the test set, resized as at test time; fvcore with acm-d2's handles)
    of the model of ``config_file`` + ``opts``, built on the CPU without weights."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import FlopCountAnalysis

    from ..config import get_acm_cfg
    from ..modeling import add_acm_flop_handles, context_modules

    cfg = get_acm_cfg(str(config_file), list(opts) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    scale = min(cfg.INPUT.MIN_SIZE_TEST / min(record["height"], record["width"]),
                cfg.INPUT.MAX_SIZE_TEST / max(record["height"], record["width"]))
    size = (int(record["height"] * scale + 0.5), int(record["width"] * scale + 0.5))
    analysis = add_acm_flop_handles(FlopCountAnalysis(model, [{"image": torch.rand(3, *size) * 255}]))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        flops = analysis.total()
    return {
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "context_parameters_m": sum(p.numel() for m in context_modules(model).values() for p in m.parameters()) / 1e6,
        "gflops": flops / 1e9,
        "flops_input": list(size),
    }


def run_comparison(config_file, output_dir, variants: Sequence[str], seeds: int, base_opts: Sequence[str],
                   backbones: Sequence[Optional[str]] = (None,), jobs: int = 2, threads: int = 1,
                   slurm: Optional[SlurmSettings] = None, retry_failed: bool = False, wait: bool = True,
                   dry_run: bool = False, command: str = "", poll_s: float = 30.0) -> Dict:
    """Run the grid (backbones x variants x seeds), then write the table, chart and JSON.

    With ``dry_run`` nothing runs: returns {"commands": [one line per run]}. Otherwise it holds
    a :class:`~acm_d2.experiments.grid.GridLock` on ``output_dir`` until it returns
    (:class:`~acm_d2.experiments.grid.GridInUseError` naming the other grid command), and returns
    {"markdown", "chart", "json": paths, "table", "columns", "failed", "running"}."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..config import get_acm_cfg
    from ..data import ensure_synthetic_dataset
    from .grid import backbone_of

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    for option, names in (("--variants", list(variants)), ("--backbones", list(backbones))):
        repeated = sorted({str(n) for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{option} names {', '.join(repeated)} more than once: each is one row of the table, "
                             f"trained once per seed; name each once")
    if not variants:
        raise ValueError(f"--variants names no variant; choose from {list(VARIANTS)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds {seeds!r}: expected the number of seeds, at least 1 (runs SEED 0 .. n-1)")
    cfg = get_acm_cfg(str(config_file), list(base_opts))
    runs = plan(config_file, output_dir, list(backbones), list(variants), seeds, list(base_opts), VARIANTS, cfg.MODEL.WEIGHTS)
    if dry_run:
        if slurm is None:
            return {"commands": [run.command(config_file) for run in runs]}
        job = (f"job: {slurm.nodes} node(s) x {slurm.gpus_per_node} GPU(s), {slurm.time_min} min"
               f"{', partition ' + slurm.partition if slurm.partition else ''}"
               f"{', account ' + slurm.account if slurm.account else ''}: ")
        return {"commands": [job + run.command(config_file) for run in runs]}
    out = Path(output_dir).resolve()
    with GridLock(out):  # held until the report is written: a second grid command on ``out`` is refused
        ensure_synthetic_dataset(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        test_set = cfg.DATASETS.TEST[0]
        DatasetCatalog.get(test_set)  # loading sets the metadata's thing_classes
        meta = MetadataCatalog.get(test_set)
        context_classes = list(meta.get("context_classes", []))
        outcome = run_grid(runs, config_file, _kq_similarity(config_file), jobs=jobs, threads=threads, slurm=slurm,
                           retry_failed=retry_failed, wait=wait, poll_s=poll_s)
        _add_run_files(outcome["finished"], runs, meta.get("json_file"), context_classes)
        costs = _costs(config_file, runs, out)
        rows = [(b, v) for b in backbones for v in variants]
        table, columns = summarize(outcome["finished"], rows, list(meta.get("thing_classes", [])), context_classes,
                                   list(meta.get("local_classes", [])), costs)
        paper_backbones = {b: b or backbone_of(cfg) for b in backbones}
        md, png, js = out / "comparison.md", out / "comparison.png", out / "comparison.json"
        write_markdown(md, table, columns, rows, command, seeds, context_classes, list(meta.get("local_classes", [])),
                       outcome["failed"], outcome["running"], paper_backbones if test_set == "coco_2017_val" else None)
        write_chart(png, table, columns, rows)
        with open(js, "w") as f:
            json.dump({"command": command, "runs": outcome["finished"], "failed": outcome["failed"],
                       "running": outcome["running"], "costs": {" ".join(filter(None, k)): c for k, c in costs.items()},
                       "columns": columns, "table": {" ".join(filter(None, k)): {c: list(ms) for c, ms in t.items()}
                                                      for k, t in table.items()}}, f, indent=1)
        return {"markdown": str(md), "chart": str(png), "json": str(js), "table": table, "columns": columns,
                "failed": outcome["failed"], "running": outcome["running"]}


def _costs(config_file, runs: Sequence[GridRun], out: Path) -> Dict:
    """model_costs of each (backbone, variant) of the grid (seed 0's overrides), cached in
    ``out/costs.json`` by the identity of the config without SEED (its content and the code)."""
    cache_path = out / "costs.json"
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    costs = {}
    code = code_version()
    for run in runs:
        key = (run.backbone, run.variant)
        if key in costs:
            continue
        opts = [o for o in run.opts[:-2]]  # without SEED
        cache_key = json.dumps(run_identity(config_file, opts, code), sort_keys=True)
        if cache_key not in cache:
            try:
                cache[cache_key] = model_costs(config_file, opts)
            except Exception as e:  # a cost that cannot be measured leaves its cells empty, never the table
                logger.warning("no parameter / FLOP count for %s: %s", run.label, e)
                cache[cache_key] = {}
        costs[key] = cache[cache_key]
    with open(cache_path, "w") as f:
        json.dump(cache, f, indent=1)
    return costs
