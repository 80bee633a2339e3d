#!/usr/bin/env python
"""`make demo`: train Mask R-CNN + ACM on the built-in synthetic data, evaluate it, draw it.

Steps, all on the real path a user would take:

1. write the synthetic context dataset (``acm_d2.data``, docs/dataset.md) into the cache;
2. train ``configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml`` from scratch with
   ``tools/train_net.py`` (a subprocess; its ETA/metric lines show the progress), which also
   evaluates AP box / AP mask with Detectron2's COCOEvaluator at the end;
3. draw the predictions on a few val images (Detectron2 Visualizer) and the K and Q
   attention maps of one ACM block per group, upsampled over the image;
4. print AP box and AP mask, overall and per category, and the paths of what it wrote
   (also saved as ``summary.json`` in the output folder).

``--quick`` runs the same steps on the tiny dataset with a few iterations (for the tests).
Extra ``KEY VALUE`` pairs are passed to train_net.py as config overrides.
"""
import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm.yaml"

logger = logging.getLogger("acm_d2.demo")

#: Overrides of --quick: the tiny dataset (64 px, 16/8 images) and a handful of iterations.
QUICK_OPTS = [
    "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)",
    "DATASETS.TEST", "('acm_synthetic_tiny_val',)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "()",
    "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "0",
]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_train_net(config_file, opts, output_dir, threads=None, quiet=False, log_path=None):
    """Train and evaluate with tools/train_net.py in a subprocess; return its final metrics.

    ``opts`` are ``KEY VALUE`` overrides (strings). ``threads`` sets OMP_NUM_THREADS for the
    child (1 is much faster than 2 on a busy 2-core machine). With ``quiet`` the child's output
    goes to ``log_path`` only. Returns the dict of the last metrics.json entry holding
    ``bbox/AP`` (keys like ``bbox/AP``, ``segm/AP-square``). Raises RuntimeError on failure.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config_file)]
    cmd += [str(o) for o in opts] + ["OUTPUT_DIR", str(output_dir)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    logger.info("Running: %s", " ".join(cmd))
    if quiet:
        log_path = Path(log_path or output_dir / "train_net.out")
        with open(log_path, "w") as log:
            code = subprocess.call(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    else:
        code = subprocess.call(cmd, env=env, cwd=str(REPO))
    if code != 0:
        where = f" (see {log_path})" if quiet else ""
        raise RuntimeError(f"tools/train_net.py failed with exit code {code}{where}: {' '.join(cmd)}")
    return read_final_metrics(output_dir)


def read_final_metrics(output_dir) -> dict:
    """The last entry of ``output_dir/metrics.json`` that holds evaluation results."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        raise RuntimeError(f"{path} not found: did the training finish?")
    found = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                entry = json.loads(line)
                if "bbox/AP" in entry:
                    found = entry
    if found is None:
        raise RuntimeError(f"{path} holds no evaluation results (bbox/AP)")
    return {k: v for k, v in found.items() if k.startswith(("bbox/", "segm/"))}


def ap_table(metrics: dict, classes) -> dict:
    """{"bbox": {"AP": .., "AP50": .., "AP75": .., "per_category": {cls: AP}}, "segm": {...}}."""
    out = {}
    for task in ("bbox", "segm"):
        if f"{task}/AP" not in metrics:
            continue
        out[task] = {k: metrics.get(f"{task}/{k}", math.nan) for k in ("AP", "AP50", "AP75")}
        out[task]["per_category"] = {c: metrics.get(f"{task}/AP-{c}", math.nan) for c in classes}
    return out


def build_cfg(config_file, opts):
    from detectron2.config import get_cfg

    from acm_d2 import add_acm_config

    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def load_trained_model(cfg, weights):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.eval()
    return model


def draw_predictions(cfg, model, dataset_name, out_path, num_images=6, score_threshold=0.5):
    """Ground truth and predictions (Visualizer) of the first val images, as one PNG."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2.utils.visualizer import Visualizer

    meta = MetadataCatalog.get(dataset_name)
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    scale = max(1.0, 256 / max(cfg.INPUT.MIN_SIZE_TEST, 1))
    aspect = dicts[0]["width"] / dicts[0]["height"]
    wide = aspect > 1.5  # wide images: one row per image (ground truth | prediction)
    if wide:
        fig, axes = plt.subplots(len(dicts), 2, figsize=(2 * 2.4 * aspect, 2.6 * len(dicts)), squeeze=False)
        axes = axes.T
    else:
        fig, axes = plt.subplots(2, len(dicts), figsize=(2.6 * len(dicts), 5.6), squeeze=False)
    for col, d in enumerate(dicts):
        bgr = cv2.imread(d["file_name"])
        rgb = bgr[:, :, ::-1]
        h, w = bgr.shape[:2]
        image = aug.get_transform(bgr).apply_image(bgr)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            instances = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        gt = Visualizer(rgb, meta, scale=scale).draw_dataset_dict(d).get_image()
        pred = Visualizer(rgb, meta, scale=scale).draw_instance_predictions(instances).get_image()
        for row, (img, title) in enumerate(((gt, "ground truth"), (pred, f"prediction (score >= {score_threshold})"))):
            axes[row, col].imshow(img)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def acm_blocks(model):
    """{"res4.1": ACM module, ...} of the model's backbone (empty if it has no ACM)."""
    from acm_d2 import ACM

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ACM):
            # names like "backbone.bottom_up.res4.1.acm" -> "res4.1"
            parts = name.split(".")
            found[".".join(parts[-3:-1])] = module
    return found


def attention_maps_for(model, module, image_tensor, height, width):
    """Run the model on one image and return the K/Q maps of ``module``: (G, 2, h, w) numpy."""
    import torch

    captured = {}

    def hook(mod, inputs):
        captured["x"] = inputs[0].detach()

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model([{"image": image_tensor, "height": height, "width": width}])
            maps = module.attention_maps(captured["x"])  # (1, G, 2, h, w), each map sums to 1
    finally:
        handle.remove()
    return maps[0].cpu().numpy()


def draw_attention(cfg, model, dataset_name, out_path, block=None, num_images=2, max_groups=8):
    """K and Q attention maps of one ACM block, per group, upsampled over the image."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T

    blocks = acm_blocks(model)
    if not blocks:
        logger.warning("The model has no ACM module: no attention maps drawn")
        return None
    if block is None:
        res4 = sorted(k for k in blocks if k.startswith("res4"))
        block = res4[-1] if res4 else sorted(blocks)[-1]
    if block not in blocks:
        raise ValueError(f"--attention-block {block!r}: the model's ACM blocks are {sorted(blocks)}")
    module = blocks[block]
    groups = min(module.groups, max_groups)
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    aspect = dicts[0]["width"] / dicts[0]["height"]
    # one pair of columns (K | Q) per image; row 0 the image, then one row per group
    fig, axes = plt.subplots(
        groups + 1, 2 * len(dicts), figsize=(2 * len(dicts) * 1.8 * aspect, (groups + 1) * 1.8), squeeze=False
    )
    for i, d in enumerate(dicts):
        bgr = cv2.imread(d["file_name"])
        rgb = bgr[:, :, ::-1]
        h, w = bgr.shape[:2]
        image = aug.get_transform(bgr).apply_image(bgr)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        maps = attention_maps_for(model, module, tensor, h, w)  # (G, 2, fh, fw)
        for k, name in enumerate(("K", "Q")):
            col = 2 * i + k
            axes[0, col].imshow(rgb)
            axes[0, col].set_title(f"image {d['image_id']}", fontsize=7)
            for g in range(groups):
                m = cv2.resize(maps[g, k], (w, h), interpolation=cv2.INTER_LINEAR)
                ax = axes[g + 1, col]
                ax.imshow(rgb)
                ax.imshow(m, cmap="jet", alpha=0.55)
                ax.set_title(f"{name} map, group {g}", fontsize=7)
            for ax in axes[:, col]:
                ax.axis("off")
    fig.suptitle(f"ACM attention maps of block {block} (first {groups} of {module.groups} groups)", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def format_results(aps: dict) -> str:
    lines = []
    for task, name in (("bbox", "AP box"), ("segm", "AP mask")):
        if task not in aps:
            continue
        r = aps[task]
        lines.append(f"{name}: {r['AP']:.2f}  (AP50 {r['AP50']:.2f}, AP75 {r['AP75']:.2f})")
        for cls, v in r["per_category"].items():
            lines.append(f"    {cls:<18s} {v:6.2f}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("--output-dir", default=str(REPO / "output" / "demo"))
    parser.add_argument("--quick", action="store_true", help="tiny data, a few iterations (tests)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the training process")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--attention-block", default=None, help="ACM block to draw, e.g. res4.1 (default: last of res4)")
    parser.add_argument("--skip-train", action="store_true", help="reuse model_final.pth in --output-dir")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    start = time.time()
    import torch

    from acm_d2.data import ensure_synthetic_dataset
    from acm_d2.data.visualize import draw_synthetic_samples

    device = args.device or default_device()
    opts = (QUICK_OPTS if args.quick else []) + ["MODEL.DEVICE", device] + list(args.opts)
    cfg = build_cfg(args.config_file, opts)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    # 1. data
    paths = ensure_synthetic_dataset(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    logger.info("Synthetic data in %s", paths.get("folder", "(not a built-in dataset)"))
    # 2. training + evaluation on the real path
    if args.skip_train:
        metrics = read_final_metrics(out)
    else:
        metrics = run_train_net(args.config_file, opts, out, threads=args.threads)
    classes = _thing_classes(cfg)
    aps = ap_table(metrics, classes)
    # 3. pictures
    torch.set_num_threads(max(1, args.threads))
    model = load_trained_model(cfg, out / "model_final.pth")
    test_name = cfg.DATASETS.TEST[0]
    small = dict(num_images=3) if args.quick else {}
    images = {"predictions": str(draw_predictions(cfg, model, test_name, out / "predictions.png", **small))}
    small = dict(num_images=1, max_groups=4) if args.quick else {}
    attention = draw_attention(cfg, model, test_name, out / "acm_attention.png", block=args.attention_block, **small)
    if attention is not None:
        images["attention"] = str(attention)
    if cfg.DATASETS.TRAIN[0].startswith("acm_synthetic"):
        images["samples"] = str(
            draw_synthetic_samples(out / "samples.png", cfg.DATASETS.TRAIN[0], num=4 if args.quick else 8)
        )
    summary = {
        "config_file": str(args.config_file),
        "opts": opts,
        "output_dir": str(out),
        "ap": aps,
        "images": images,
        "model": str(out / "model_final.pth"),
        "seconds": round(time.time() - start, 1),
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    report = [
        "",
        "=" * 60,
        f"ACM demo finished in {summary['seconds']:.0f} s ({device}); evaluated on {test_name}",
        format_results(aps),
        "Wrote:",
        *[f"    {k:<12s} {v}" for k, v in images.items()],
        f"    {'model':<12s} {summary['model']}",
        f"    {'summary':<12s} {out / 'summary.json'}",
        "=" * 60,
    ]
    sys.stdout.write("\n".join(report) + "\n")
    return summary


def _thing_classes(cfg):
    from detectron2.data import MetadataCatalog

    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes")
    if classes is None:
        from detectron2.data import DatasetCatalog

        DatasetCatalog.get(cfg.DATASETS.TEST[0])  # loading sets thing_classes
        classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes
    return list(classes)


if __name__ == "__main__":
    main()
