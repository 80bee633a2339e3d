"""The fast COCO evaluator (faster-coco-eval in Detectron2's COCOEvaluator) gives pycocotools'
numbers: every one of the 12 box and mask stats, and COCOEvaluator's AP tables, to 1e-4, on
images with many objects; TEST.COCO_EVAL_IMPL selects it or forces pycocotools;
tools/benchmark_coco_eval.py prints the ratio of the two."""
import json
import logging
import runpy
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, BoxMode, Instances

from acm_d2.evaluation import add_evaluation_config, build_coco_evaluator, fast_coco_eval_impl
from acm_d2.evaluation.benchmark import compare_coco_eval, synthetic_coco_evaluation
from train_net_runs import REPO

pytest.importorskip("faster_coco_eval")

# 12 images of 96 x 128 px with 20-40 objects (a few crowd) and 30-60 detections each.
SMALL = dict(num_images=12, objects_per_image=(20, 40), detections_per_image=(30, 60), num_categories=5,
             image_size=(96, 128), crowd_fraction=0.05, seed=3)


@pytest.fixture(autouse=True)
def detectron2_without_compiled_evaluator(monkeypatch):
    """Detectron2 as ``make setup`` installs it, without its C++ extension (also where it has one):
    COCOEvaluator's fast implementation is pycocotools' COCOeval until acm_d2.evaluation sets it."""
    monkeypatch.setattr(coco_evaluation, "COCOeval_opt", coco_evaluation.COCOeval)


@pytest.fixture(scope="module")
def evaluation():
    return synthetic_coco_evaluation(**SMALL)


def test_fast_evaluator_gives_the_12_pycocotools_stats(evaluation):
    dataset, results = evaluation
    assert len(dataset["annotations"]) / len(dataset["images"]) >= 20
    report = compare_coco_eval(dataset, results)
    for task in ("bbox", "segm"):
        entry = report[task]
        assert entry["impl"] == "faster_coco_eval"
        py, fast = np.array(entry["pycocotools"]["stats"]), np.array(entry["fast"]["stats"])
        assert py.shape == (12,) and np.all(py[:5] > 0.01)  # real, non-trivial AP values
        np.testing.assert_allclose(fast, py, rtol=0, atol=1e-4, err_msg=task)


def _register(tmp_path, dataset):
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(dataset))
    name = "acm_test_coco_eval_many_objects"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # sets the category id mapping in the metadata
    return name


def _predictions(dataset, results):
    """COCOEvaluator's (inputs, outputs) for the detections: Instances with boxes, masks, scores."""
    contiguous = {c["id"]: i for i, c in enumerate(dataset["categories"])}
    pairs = []
    for image in dataset["images"]:
        mine = [r for r in results if r["image_id"] == image["id"]]
        instances = Instances((image["height"], image["width"]))
        boxes = np.array([r["bbox"] for r in mine], dtype=np.float32)
        instances.pred_boxes = Boxes(torch.from_numpy(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)))
        instances.scores = torch.tensor([r["score"] for r in mine])
        instances.pred_classes = torch.tensor([contiguous[r["category_id"]] for r in mine])
        masks = mask_util.decode([dict(r["segmentation"], counts=r["segmentation"]["counts"].encode()) for r in mine])
        instances.pred_masks = torch.from_numpy(masks).permute(2, 0, 1).bool()
        pairs.append(({"image_id": image["id"]}, {"instances": instances}))
    return pairs


def _evaluate(cfg, name, pairs):
    evaluator = build_coco_evaluator(cfg, name)
    evaluator.reset()
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
    return evaluator, evaluator.evaluate()


def test_coco_evaluator_tables_match_and_the_setting_forces_pycocotools(tmp_path, evaluation, caplog):
    dataset, results = evaluation
    name = _register(tmp_path, dataset)
    pairs = _predictions(dataset, results)
    cfg = get_cfg()
    add_evaluation_config(cfg)
    assert cfg.TEST.COCO_EVAL_IMPL == "auto"
    fast_evaluator, fast = _evaluate(cfg, name, pairs)
    assert fast_evaluator._use_fast_impl and coco_evaluation.COCOeval_opt.__module__.startswith("faster_coco_eval")

    cfg.TEST.COCO_EVAL_IMPL = "pycocotools"
    with caplog.at_level(logging.INFO, logger="acm_d2.evaluation"):
        official_evaluator, official = _evaluate(cfg, name, pairs)
    assert not official_evaluator._use_fast_impl
    assert "with pycocotools (TEST.COCO_EVAL_IMPL pycocotools)" in caplog.text

    assert set(fast) == set(official) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert fast[task].keys() == official[task].keys()
        assert len(fast[task]) == 6 + 5  # AP, AP50, AP75, APs, APm, APl and the 5 per-category APs
        assert official[task]["AP"] > 1.0  # percent
        for key, value in official[task].items():
            assert fast[task][key] == pytest.approx(value, abs=1e-4, nan_ok=True), (task, key)

    cfg.TEST.COCO_EVAL_IMPL = "fast"
    with pytest.raises(ValueError, match=r"TEST.COCO_EVAL_IMPL must be one of \['auto', 'pycocotools'\], got 'fast'"):
        build_coco_evaluator(cfg, name)


def test_without_faster_coco_eval_auto_falls_back_to_pycocotools(tmp_path, evaluation, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_faster_coco_eval(name, *args, **kwargs):
        if name.startswith("faster_coco_eval"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faster_coco_eval)
    assert fast_coco_eval_impl() is None
    cfg = get_cfg()
    add_evaluation_config(cfg)
    with caplog.at_level(logging.INFO, logger="acm_d2.evaluation"):
        evaluator = build_coco_evaluator(cfg, _register(tmp_path, evaluation[0]))
    assert not evaluator._use_fast_impl and coco_evaluation.COCOeval_opt is coco_evaluation.COCOeval
    assert "pip install faster-coco-eval" in caplog.text


def test_benchmark_script_prints_the_ratio(tmp_path, monkeypatch, capsys):
    """tools/benchmark_coco_eval.py on a few images: the table's ratios are those of its report."""
    report_file = tmp_path / "coco_eval.json"
    argv = ["--images", "4", "--max-dets", "20", "--objects", "10", "--json", str(report_file)]
    monkeypatch.setattr(sys, "argv", ["benchmark_coco_eval.py", *argv])
    runpy.run_path(str(REPO / "tools" / "benchmark_coco_eval.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(report_file.read_text())
    assert report["images"] == 4 and 4 * 10 <= report["detections"] <= 4 * 20
    rows = {words[0]: words for words in map(str.split, lines) if words and words[0] in ("bbox", "segm", "both")}
    assert set(rows) == {"bbox", "segm", "both"}
    for task in ("bbox", "segm"):
        entry = report["tasks"][task]
        assert entry["impl"] == "faster_coco_eval" and entry["max_abs_diff"] <= 1e-4
        assert entry["speedup"] == pytest.approx(entry["pycocotools"]["seconds"] / entry["fast"]["seconds"])
        assert rows[task][3] == f"{entry['speedup']:.1f}x"  # the printed ratio is the measured one
    seconds = {name: sum(entry[name]["seconds"] for entry in report["tasks"].values()) for name in ("pycocotools", "fast")}
    assert rows["both"][3] == f"{seconds['pycocotools'] / seconds['fast']:.1f}x"


def test_detectron2s_compiled_evaluator_is_kept(monkeypatch):
    compiled = type("COCOeval_opt", (coco_evaluation.COCOeval,), {"__module__": "detectron2.evaluation.fast_eval_api"})
    monkeypatch.setattr(coco_evaluation, "COCOeval_opt", compiled)
    assert fast_coco_eval_impl() == "detectron2" and coco_evaluation.COCOeval_opt is compiled
