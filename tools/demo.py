#!/usr/bin/env python
"""`make demo`: train Mask R-CNN + ACM on the built-in synthetic data, evaluate it, draw it.

1. write the synthetic context dataset (acm_d2/data, docs/dataset.md) into the cache;
2. train configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml from scratch with tools/train_net.py
   (a subprocess: the path a user takes), which evaluates AP box / AP mask at the end;
3. draw predictions on a few val images and the K and Q attention maps of one ACM block;
4. print AP box and AP mask, overall and per category, and what it wrote (also in
   ``summary.json`` in the output folder).

``--quick`` runs the same steps on the tiny dataset with a few iterations (for the tests).
Extra ``KEY VALUE`` pairs are config overrides for train_net.py.
"""
import argparse
import json
import logging
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from acm_d2.config import get_acm_cfg, load_model_for_inference
from acm_d2.data import ensure_synthetic_dataset
from acm_d2.data.visualize import draw_synthetic_samples
from acm_d2.experiments.pictures import draw_attention, draw_predictions
from acm_d2.experiments.runs import QUICK_OPTS, REPO, ap_table, format_ap_table, read_final_metrics, run_train_net


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm.yaml"))
    parser.add_argument("--output-dir", default=str(REPO / "output" / "demo"))
    parser.add_argument("--quick", action="store_true", help="tiny data, a few iterations (tests)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the training process")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--attention-block", default=None, help="ACM block to draw, e.g. res4.1 (default: last of res4)")
    parser.add_argument("--skip-train", action="store_true", help="reuse model_final.pth in --output-dir")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # SEED 0: a fresh clone prints the figures of the README (a later SEED in opts wins)
    opts = (QUICK_OPTS if args.quick else []) + ["MODEL.DEVICE", device, "SEED", "0"] + list(args.opts)
    cfg = get_acm_cfg(args.config_file, opts)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    paths = ensure_synthetic_dataset(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    logging.info("Synthetic data in %s", paths.get("folder", "(not a built-in dataset)"))
    # --overwrite: each demo trains afresh (the earlier run's files go to OUTPUT_DIR/previous_runs/)
    metrics = read_final_metrics(out) if args.skip_train else run_train_net(args.config_file, ["--overwrite"] + opts, out, threads=args.threads)
    test_name = cfg.DATASETS.TEST[0]
    DatasetCatalog.get(test_name)  # loading sets the metadata's thing_classes
    aps = ap_table(metrics, MetadataCatalog.get(test_name).thing_classes)

    torch.set_num_threads(max(1, args.threads))
    model = load_model_for_inference(args.config_file, opts + ["MODEL.WEIGHTS", str(out / "model_final.pth")]).model
    images = {"predictions": str(draw_predictions(cfg, model, test_name, out / "predictions.png", num_images=3 if args.quick else 6))}
    attention = draw_attention(cfg, model, test_name, out / "acm_attention.png", block=args.attention_block,
                               num_images=1 if args.quick else 2)
    if attention is not None:
        images["attention"] = str(attention)
    if cfg.DATASETS.TRAIN[0].startswith("acm_synthetic"):
        images["samples"] = str(draw_synthetic_samples(out / "samples.png", cfg.DATASETS.TRAIN[0], num=4 if args.quick else 8))
    summary = {"config_file": str(args.config_file), "opts": opts, "output_dir": str(out), "ap": aps, "images": images,
               "model": str(out / "model_final.pth"), "seconds": round(time.time() - start, 1)}
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join([
        "", "=" * 60, f"ACM demo finished in {summary['seconds']:.0f} s ({device}); evaluated on {test_name}",
        format_ap_table(aps), "Wrote:", *[f"    {k:<12s} {v}" for k, v in images.items()],
        f"    {'model':<12s} {summary['model']}", f"    {'summary':<12s} {out / 'summary.json'}", "=" * 60,
    ]))
    return summary


if __name__ == "__main__":
    main()
