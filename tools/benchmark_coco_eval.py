#!/usr/bin/env python
"""pycocotools vs the fast COCO evaluator (faster-coco-eval) on a synthetic COCO-sized evaluation.

    python tools/benchmark_coco_eval.py                  # 5,000 images, 50-100 detections each
    python tools/benchmark_coco_eval.py --images 500 --json coco_eval.json

Both evaluate the same detections (boxes and masks) as Detectron2's COCOEvaluator does; the
script prints the seconds of each, the ratio, and the largest difference of the 12 COCO
stats. Logic: :mod:`acm_d2.evaluation.benchmark`.
"""
import argparse
import json
import logging
import platform
import time

import torch

from acm_d2.evaluation.benchmark import compare_coco_eval, synthetic_coco_evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images (default 5000, COCO val2017)")
    parser.add_argument("--max-dets", type=int, default=100, help="detections per image: between half this and this (default 100)")
    parser.add_argument("--objects", type=int, default=15, help="ground-truth objects per image: 1 to this (default 15; COCO: 7.3 on average)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # its summary table, printed per run

    start = time.perf_counter()
    dataset, results = synthetic_coco_evaluation(
        args.images, objects_per_image=(1, args.objects), detections_per_image=(args.max_dets // 2, args.max_dets), seed=args.seed
    )
    print(f"{args.images} images, {len(dataset['annotations'])} objects, {len(results)} detections "
          f"(made in {time.perf_counter() - start:.0f} s); CPU threads: {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    report = compare_coco_eval(dataset, results)
    print(f"{'task':6} {'pycocotools s':>14} {'fast s':>8} {'ratio':>7} {'max |stat diff|':>16}  fast evaluator")
    for task, entry in report.items():
        print(f"{task:6} {entry['pycocotools']['seconds']:14.1f} {entry['fast']['seconds']:8.1f} "
              f"{entry['speedup']:6.1f}x {entry['max_abs_diff']:16.2e}  {entry['impl']}")
    total_py = sum(e["pycocotools"]["seconds"] for e in report.values())
    total_fast = sum(e["fast"]["seconds"] for e in report.values())
    print(f"{'both':6} {total_py:14.1f} {total_fast:8.1f} {total_py / total_fast:6.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "detections": len(results), "objects": len(dataset["annotations"]), "tasks": report}, f, indent=1)


if __name__ == "__main__":
    main()
