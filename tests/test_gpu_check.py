"""tools/gpu_check.py on the CPU (--device cpu --quick): every part runs and reports, the budget
skips and stops parts with a reason, and bad options are refused (docs/benchmark.md, "On a GPU")."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acm_d2.benchmarks import gpu_check
from acm_d2.modeling import CONTEXT_MODULE_REGISTRY

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_cpu_check_runs_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("ACM_D2_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--quick", "--output-dir", str(out)],
        cwd=str(REPO), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert {p: report[p]["status"] for p in gpu_check.PARTS} == {p: "done" for p in gpu_check.PARTS}, {
        p: report[p].get("reason") for p in gpu_check.PARTS}
    assert report["device"]["torch"] == torch.__version__ and report["device"]["requested_device"] == "cpu"
    modules = {name for name, _ in CONTEXT_MODULE_REGISTRY}

    # the CUDA tests were collected and, without a GPU, every one skipped
    tests = report["cuda_tests"]
    assert tests["counts"]["skipped"] == len(tests["tests"]) >= 10 and tests["counts"]["failed"] == 0
    # the model: every registered module over plain, in float32 and AMP (bfloat16 on the CPU)
    model = report["model"]
    assert set(model["precisions"]) == {"float32", "bfloat16"}
    for r in model["precisions"].values():
        assert set(r["over_plain"]) == modules
        assert all(v["training"] > 0 and v["inference"] > 0 for v in r["over_plain"].values())
        assert r["over_plain"]["ACM"]["parameters"] > 0
    # the module: three precisions, every module at every tiny stage, finite and close under autocast
    module = report["module"]
    assert set(module["timed"]) == {"float32", "bfloat16", "float16"}
    for results in module["timed"].values():
        assert {r["stage"] for r in results} == {"tiny3", "tiny5"}
        assert all(set(r["saved_over_x"]) == modules for r in results)
    for precision, errors in module["autocast_errors"].items():
        assert {e["module"] for e in errors} == modules
        for e in errors:
            assert e["finite"] and 0 <= e["output_error"] < 0.1 and 0 <= e["grad_error"] < 0.5, (precision, e)
    assert {"NL_saved_mib", "CC_saved_mib"} <= set(module["attention_memory"][0])
    # the demo: CPU against CPU agrees exactly; the demo evaluated
    curve = report["demo"]["loss_curve"]
    assert curve["matching_iterations"] == curve["iterations"] == 3
    assert curve["max_relative_difference"] == [0.0, 0.0, 0.0] and "loss_acm_orth" in curve["terms"]
    assert report["demo"]["demo"]["status"] == "done" and 0 <= report["demo"]["demo"]["ap_box"] <= 100
    # the goals are read off the measurements
    assert {g["goal"] for g in report["goals"]} >= {
        "ACM training-step overhead over plain, float32", "finite Y and dL/dX under float16 autocast (X ~ N(0, 8^2))"}
    markdown = (out / "gpu_check.md").read_text()
    for heading in ("## Goals", "## CUDA tests", "## Mask R-CNN R-50-FPN", "## One module", "## Demo"):
        assert heading in markdown
    assert markdown.strip() in proc.stdout
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["cuda_tests.log", "demo.log", "model.log", "module.log"]


def test_parts_that_do_not_fit_the_budget_are_skipped_with_a_reason(tmp_path):
    report = gpu_check.run_check("cpu", quick=True, budget_s=5, output_dir=tmp_path)
    assert report["device"]["status"] == "done"
    for part in gpu_check.PARTS[1:]:
        assert report[part]["status"] == "skipped"
        assert "of the 5 s budget, the part needs about" in report[part]["reason"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "**model**: skipped (" in markdown
    assert json.loads((tmp_path / "gpu_check.json").read_text())["model"]["status"] == "skipped"


def test_a_part_past_the_budget_is_stopped(tmp_path):
    result = gpu_check.run_part("cuda_tests", "cpu", True, tmp_path, timeout_s=1)
    assert result["status"] == "failed"
    assert result["reason"].startswith("stopped at the end of the budget after 1 s")
    assert (tmp_path / "logs" / "cuda_tests.log").is_file()


def test_parts_not_asked_for_are_skipped_and_unknown_ones_refused(tmp_path):
    report = gpu_check.run_check("cpu", quick=True, budget_s=60, output_dir=tmp_path, parts=("device",))
    assert report["cuda_tests"] == {"status": "skipped", "reason": "not among --parts"}
    with pytest.raises(ValueError, match="--parts modle: expected names among device,cuda_tests,model,module,demo"):
        gpu_check.run_check("cpu", quick=True, budget_s=60, output_dir=tmp_path, parts=("device", "modle"))
    with pytest.raises(ValueError, match="--budget-s 0: expected a positive number"):
        gpu_check.run_check("cpu", quick=True, budget_s=0, output_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_refused_naming_the_option(tmp_path):
    with pytest.raises(RuntimeError, match="--device cuda: torch .* sees no CUDA device.*use --device cpu"):
        gpu_check.run_check("cuda", quick=True, budget_s=60, output_dir=tmp_path)


def _timed(ms):
    return {"min_ms": ms, "median_ms": ms}


def test_goals_are_read_off_the_measurements():
    over_plain = {"ACM": {"training": 1.02, "inference": 1.01, "parameters": 1}}
    report = {
        "model": {"status": "done", "precisions": {"float32": {"over_plain": over_plain},
                                                   "float16": {"over_plain": {"ACM": {**over_plain["ACM"], "training": 1.05}}}}},
        "module": {"status": "done",
                   "timed": {"float32": [{"stage": "res2", "over_floor": {"ACM_train_contiguous": 9.0, "ACM_train_channels_last": 9.0}},
                                         {"stage": "res4", "over_floor": {"ACM_train_contiguous": 1.4, "ACM_train_channels_last": 1.6}}]},
                   "autocast_errors": {"float16": [{"module": "NL", "stage": "res4", "finite": False}]}},
    }
    rows = {g["goal"]: (g["value"], g["met"]) for g in gpu_check.goals(report)}
    assert rows == {
        "ACM training-step overhead over plain, float32": ("+2.0%", True),
        "ACM training-step overhead over plain, float16": ("+5.0%", False),
        "ACM forward+backward over the floor at res4, float32": ("1.60x", False),
        "finite Y and dL/dX under float16 autocast (X ~ N(0, 8^2))": ("non-finite: NL at res4", False),
    }
