"""Backbones compared on equal terms: plain vs + SE vs + ACM, and ACM with parts left out.

Each variant is one config with the overrides of :data:`VARIANTS` (``MODEL.ACM.MODULE`` "none"
is the plain ResNet through the same code; ``MODEL.ACM.VARIANT`` the paper's Table 2a
ablation). Every (variant, seed) run is a ``tools/train_net.py`` training and COCO evaluation
with ``SEED`` set; finished runs found in the output folder are reused, so an interrupted
comparison resumes. For runs whose ACM has K and Q, the mean |cosine(K, Q)| over the
validation images and modules is measured from the trained weights (the paper: 0.1113 with
lambda 0, 0.0394 with lambda 0.1). :func:`run_comparison` writes ``comparison.md`` (mean +-
std over seeds), ``comparison.png`` and ``comparison.json``.
"""
import json
import logging
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Sequence

from .runs import run_train_net

__all__ = ["VARIANTS", "context_label_accuracy", "mean_abs_kq_cosine", "run_comparison", "summarize"]

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


def _run_dir(out: Path, variant: str, seed: int) -> Path:
    """A folder name for a variant: "P(X+K)" -> "P_X+K_"."""
    safe = "".join(ch if ch.isalnum() or ch in "+-=" else "_" for ch in variant)
    return out / safe / f"seed{seed}"


def _run_one(config_file, base_opts, variant, seed, out, threads, reuse):
    run_dir = _run_dir(out, variant, seed)
    done = run_dir / "result.json"
    if done.is_file() and reuse:
        with open(done) as f:
            saved = json.load(f)
        if saved.get("opts") == base_opts + VARIANTS[variant] + ["SEED", str(seed)]:
            logger.info("Reusing %s", done)
            return saved
    opts = base_opts + VARIANTS[variant] + ["SEED", str(seed)]
    start = time.time()
    logger.info("Training %s seed %d -> %s", variant, seed, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_train_net(config_file, opts, run_dir, threads=threads or None, log_path=run_dir / "train_net.out")
    except RuntimeError as e:  # e.g. "Training has diverged": report it, keep the other runs
        logger.error("%s seed %d failed: %s", variant, seed, e)
        return {"variant": variant, "seed": seed, "opts": opts, "metrics": {}, "failed": str(e)}
    settings = dict(zip(opts[::2], opts[1::2]))  # a later override wins, as in the config
    if settings.get("MODEL.ACM.MODULE") == "ACM" and settings.get("MODEL.ACM.VARIANT", "P(X+(K-Q))") in ("P(X+(K-Q))", "X+(K-Q)"):
        metrics["kq/mean_abs_cosine"] = mean_abs_kq_cosine(config_file, opts + ["MODEL.WEIGHTS", str(run_dir / "model_final.pth")])
    result = {"variant": variant, "seed": seed, "opts": opts, "metrics": metrics, "seconds": time.time() - start}
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    logger.info(
        "%s seed %d: AP box %.2f, AP mask %.2f (%.0f s)",
        variant, seed, metrics.get("bbox/AP", math.nan), metrics.get("segm/AP", math.nan), result["seconds"],
    )
    return result


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


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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


def _add_context_accuracy(results, cfg, context_classes, out):
    """Add ``context/label_acc`` to each run's metrics (from its saved COCO detections)."""
    from detectron2.data import MetadataCatalog

    gt_json = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("json_file")
    for r in results:
        if r.get("failed"):
            continue
        det = _run_dir(out, r["variant"], r["seed"]) / "inference" / "coco_instances_results.json"
        if gt_json and det.is_file():
            r["metrics"]["context/label_acc"] = context_label_accuracy(det, gt_json, context_classes)


def summarize(results, variants, classes, context_classes, local_classes):
    """{variant: {column: (mean, std, n)}} with columns "box AP", "mask AP", "box <cls>", ..."""
    columns = []
    for task, short in (("bbox", "box"), ("segm", "mask")):
        columns.append((f"{short} AP", lambda m, t=task: m.get(f"{t}/AP", math.nan)))
        for group, members in (("context", context_classes), ("local", local_classes)):
            if members:
                columns.append(
                    (f"{short} {group}", lambda m, t=task, c=members: statistics.fmean(m.get(f"{t}/AP-{x}", math.nan) for x in c))
                )
        for cls in classes:
            columns.append((f"{short} {cls}", lambda m, t=task, c=cls: m.get(f"{t}/AP-{c}", math.nan)))
    if context_classes:
        columns.append(("label context_label_acc", lambda m: m.get("context/label_acc", math.nan)))
    if any("kq/mean_abs_cosine" in r["metrics"] for r in results):
        columns.append(("kq mean_abs_cosine", lambda m: m.get("kq/mean_abs_cosine", math.nan)))
    table = {}
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant and not r.get("failed")]
        table[variant] = {name: (*_mean_std([fn(r["metrics"]) for r in runs]), len(runs)) for name, fn in columns}
    return table, [name for name, _ in columns]


def write_markdown(path, table, columns, variants, command, n_seeds, context_classes, local_classes, failures=()):
    def cell(ms):
        mean, std, _ = ms
        return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"

    lines = [
        f"AP (COCO AP@[.5:.95], in %) as mean ± sample std over {n_seeds} seed(s).",
        "",
        f"Command: `{command}`",
        "",
    ]
    if context_classes or local_classes:
        lines += [
            f"Context categories (label decided only by far-away context): {', '.join(context_classes)}; "
            f"local categories (control): {', '.join(local_classes)}. "
            f"\"context\"/\"local\" columns are the mean AP over those categories. "
            f"\"context_label_acc\": percent of ground-truth objects of the context categories whose "
            f"best-scoring detection among those categories (box IoU >= 0.5) has the right label "
            f"(a miss counts as wrong).",
            "",
        ]
    sections = [("box", "AP box"), ("mask", "AP mask")]
    if any(c.startswith("label ") for c in columns):
        sections.append(("label", "Label accuracy on the context categories (%)"))
    if any(c.startswith("kq ") for c in columns):
        sections.append(("kq", "Mean |cosine(K, Q)| on validation (x 100; paper: 11.13 with lambda 0, 3.94 with 0.1)"))
    for short, title in sections:
        cols = [c for c in columns if c.startswith(short + " ")]
        lines.append(f"### {title}")
        lines.append("")
        lines.append("| variant | " + " | ".join(c[len(short) + 1:] for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(cell(table[v][c]) for c in cols) + " |")
        lines.append("")
    if failures:
        lines.append("Failed runs (left out of the means):")
        lines += [f"- {r['variant']} seed {r['seed']}: {r['failed'].splitlines()[0]}" for r in failures]
        lines.append("")
    Path(path).write_text("\n".join(lines))


def write_chart(path, table, columns, variants):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), squeeze=False)
    for ax, (short, title) in zip(axes[0], (("box", "AP box"), ("mask", "AP mask"))):
        cols = [c for c in columns if c.startswith(short + " ")]
        x = np.arange(len(cols))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            means = [table[v][c][0] for c in cols]
            stds = [table[v][c][1] for c in cols]
            ax.bar(x + (i - (len(variants) - 1) / 2) * width, np.nan_to_num(means), width, yerr=np.nan_to_num(stds),
                   capsize=2, label=v)
        ax.set_xticks(x)
        ax.set_xticklabels([c[len(short) + 1:] for c in cols], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{title}: mean ± std over seeds")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_comparison(config_file, output_dir, variants: Sequence[str], seeds: int, base_opts: Sequence[str],
                   jobs: int = 2, threads: int = 1, reuse: bool = True, command: str = "") -> Dict:
    """Train every (variant, seed), ``jobs`` at a time, and write the table, chart and JSON.

    Returns {"markdown": path, "chart": path, "table": ..., "columns": [...]}."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..config import get_acm_cfg
    from ..data import ensure_synthetic_dataset

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    cfg = get_acm_cfg(str(config_file), list(base_opts))
    ensure_synthetic_dataset(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for s in range(seeds) for v in variants]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda job: _run_one(config_file, list(base_opts), job[0], job[1], out, threads, reuse), todo))

    DatasetCatalog.get(cfg.DATASETS.TEST[0])  # loading sets the metadata's thing_classes
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    classes = list(meta.get("thing_classes", []))
    context_classes = list(meta.get("context_classes", []))
    local_classes = list(meta.get("local_classes", []))
    if context_classes:
        _add_context_accuracy(results, cfg, context_classes, out)
    table, columns = summarize(results, list(variants), classes, context_classes, local_classes)
    md, png = out / "comparison.md", out / "comparison.png"
    failures = [r for r in results if r.get("failed")]
    write_markdown(md, table, columns, list(variants), command, seeds, context_classes, local_classes, failures)
    write_chart(png, table, columns, list(variants))
    with open(out / "comparison.json", "w") as f:
        json.dump({"command": command, "runs": results, "columns": columns,
                   "table": {v: {c: list(ms) for c, ms in t.items()} for v, t in table.items()}}, f, indent=1)
    return {"markdown": str(md), "chart": str(png), "table": table, "columns": columns}
