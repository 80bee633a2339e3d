"""The shortened demo runs the real path (data, tools/train_net.py, COCO eval, pictures)."""
import json
import math
import subprocess
import sys

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_writes_ap_and_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("ACM_D2_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--quick", "--device", "cpu", "--output-dir", str(out)],
        cwd=str(REPO), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    classes = ["lesion_emergency", "lesion_treated", "square", "triangle"]
    for task in ("bbox", "segm"):
        ap = summary["ap"][task]
        assert 0.0 <= ap["AP"] <= 100.0
        assert set(ap["per_category"]) == set(classes)
        assert all(isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 100.0) for v in ap["per_category"].values())
    assert set(summary["images"]) == {"predictions", "attention", "samples"}
    for path in summary["images"].values():
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (out / "model_final.pth").is_file()
    assert "AP box:" in proc.stdout and "AP mask:" in proc.stdout and str(out / "predictions.png") in proc.stdout
    # the training ran through tools/train_net.py and evaluated with COCOEvaluator
    assert (out / "inference" / "coco_instances_results.json").is_file()
