"""pycocotools vs the fast COCO evaluator on a synthetic COCO-sized evaluation (same numbers, time).

:func:`synthetic_coco_evaluation` makes a COCO instances dataset and detections for it
(boxes, RLE masks and scores, as Detectron2's COCOEvaluator writes them);
:func:`compare_coco_eval` evaluates them with both implementations exactly as
COCOEvaluator does for one task (``loadRes``, ``evaluate``, ``accumulate``, ``summarize``)
and reports the seconds and the 12 COCO stats of each. tools/benchmark_coco_eval.py prints it.
"""
import contextlib
import copy
import io
import logging
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from . import fast_coco_eval_impl

__all__ = ["synthetic_coco_evaluation", "run_cocoeval", "compare_coco_eval"]

logger = logging.getLogger(__name__)


def _polygon(rng, x: float, y: float, w: float, h: float, sides: int = 8) -> List[float]:
    """An irregular convex-ish polygon inscribed in the box (x, y, w, h), as COCO [x1, y1, x2, y2, ...]."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, sides))
    radius = rng.uniform(0.7, 1.0, sides)
    xs = x + w / 2 * (1 + radius * np.cos(angles))
    ys = y + h / 2 * (1 + radius * np.sin(angles))
    return np.stack([xs, ys], 1).ravel().round(2).tolist()


def synthetic_coco_evaluation(
    num_images: int = 5000,
    objects_per_image: Tuple[int, int] = (1, 15),
    detections_per_image: Tuple[int, int] = (50, 100),
    num_categories: int = 80,
    image_size: Tuple[int, int] = (480, 640),
    crowd_fraction: float = 0.01,
    seed: int = 0,
) -> Tuple[dict, List[dict]]:
    """A COCO instances dataset and detections for it.

    Args:
        num_images: images (COCO val2017: 5,000).
        objects_per_image: inclusive range of ground-truth objects per image (COCO val: 7.3 on average).
        detections_per_image: inclusive range of detections per image (Detectron2 keeps at most 100).
        num_categories: categories (COCO: 80).
        image_size: (height, width) in pixels.
        crowd_fraction: share of ground-truth objects marked ``iscrowd``.

    Returns:
        ``(dataset, results)``: the instances dataset as a dict (images, annotations with
        polygon segmentations, categories) and the detections as COCOEvaluator's
        ``coco_instances_results.json`` entries: image_id, category_id, bbox (XYWH, px),
        score, segmentation (compressed RLE). 60% of the detections are ground-truth
        objects with jittered boxes and shapes (10% of them with a wrong category), scored
        0.3-1; the others are false positives anywhere, scored 0.05-0.6.
    """
    rng = np.random.RandomState(seed)
    height, width = image_size
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        objects = []
        for _ in range(rng.randint(objects_per_image[0], objects_per_image[1] + 1)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(0.8 * min(width, height)), 2))  # small to large
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.randint(1, num_categories + 1))
            polygon = _polygon(rng, x, y, w, h)
            rle = mask_util.frPyObjects([polygon], height, width)[0]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": [round(float(v), 2) for v in (x, y, w, h)], "area": float(mask_util.area(rle)),
                "iscrowd": int(rng.rand() < crowd_fraction), "segmentation": [polygon],
            })
            objects.append((x, y, w, h, category, np.reshape(polygon, (-1, 2))))
        for k in range(rng.randint(detections_per_image[0], detections_per_image[1] + 1)):
            if objects and rng.rand() < 0.6:  # a detection of an object, jittered by ~5% of its size
                x0, y0, w0, h0, category, points = objects[k % len(objects)]
                x, y = x0 + rng.randn() * 0.05 * w0, y0 + rng.randn() * 0.05 * h0
                w, h = w0 * np.exp(rng.randn() * 0.05), h0 * np.exp(rng.randn() * 0.05)
                polygon = ((points - [x0, y0]) * [w / w0, h / h0] + [x, y]).ravel().tolist()  # the object's shape, moved
                if rng.rand() < 0.1:
                    category = int(rng.randint(1, num_categories + 1))
                score = rng.uniform(0.3, 1.0)
            else:  # a false positive anywhere
                w, h = np.exp(rng.uniform(np.log(8), np.log(0.5 * min(width, height)), 2))
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                category = int(rng.randint(1, num_categories + 1))
                score = rng.uniform(0.05, 0.6)
                polygon = _polygon(rng, x, y, w, h)
            rle = mask_util.frPyObjects([polygon], height, width)[0]
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({
                "image_id": image_id, "category_id": category, "bbox": [float(x), float(y), float(w), float(h)],
                "score": float(score), "segmentation": rle,
            })
    categories = [{"id": c, "name": f"class_{c}"} for c in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_cocoeval(coco_gt: COCO, results: Sequence[dict], iou_type: str, cocoeval_class) -> COCOeval:
    """Evaluate ``results`` as COCOEvaluator does for one task (for "segm" without the boxes,
    so that the areas are the masks'); return the summarized evaluator (``stats``: 12 numbers)."""
    results = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = cocoeval_class(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def compare_coco_eval(dataset: dict, results: Sequence[dict], iou_types: Sequence[str] = ("bbox", "segm")) -> Dict[str, dict]:
    """Evaluate with pycocotools and with the fast evaluator (:func:`fast_coco_eval_impl`).

    Returns:
        For each IoU type: ``{"pycocotools": {"seconds", "stats"}, "fast": {"seconds",
        "stats"}, "impl": name of the fast evaluator, "max_abs_diff": largest difference
        of the 12 stats, "speedup": pycocotools seconds / fast seconds}``. Seconds are
        wall-clock time of loadRes + evaluate + accumulate + summarize on a fresh
        ground-truth ``COCO`` each (building it is not timed).

    Raises:
        RuntimeError: no fast evaluator is installed.
    """
    impl = fast_coco_eval_impl()
    if impl is None:
        raise RuntimeError("No fast COCO evaluator to compare: pip install faster-coco-eval")
    from detectron2.evaluation import coco_evaluation

    report = {}
    for iou_type in iou_types:
        entry = {"impl": impl}
        for name, cls in (("pycocotools", COCOeval), ("fast", coco_evaluation.COCOeval_opt)):
            coco_gt = _coco(dataset)
            start = time.perf_counter()
            evaluator = run_cocoeval(coco_gt, results, iou_type, cls)
            entry[name] = {"seconds": time.perf_counter() - start, "stats": [float(s) for s in evaluator.stats]}
            logger.info("%s %s: %.2f s", iou_type, name, entry[name]["seconds"])
        entry["max_abs_diff"] = float(np.max(np.abs(np.subtract(entry["pycocotools"]["stats"], entry["fast"]["stats"]))))
        entry["speedup"] = entry["pycocotools"]["seconds"] / entry["fast"]["seconds"]
        report[iou_type] = entry
    return report
