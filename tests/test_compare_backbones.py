"""tools/compare_backbones.py in a tiny setting (with an ablation variant) writes the table and the chart."""
import json
import subprocess
import sys

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_comparison_writes_table_and_chart(tmp_path, monkeypatch):
    monkeypatch.setenv("ACM_D2_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "compare"
    cmd = [
        sys.executable, str(REPO / "tools" / "compare_backbones.py"), "--quick", "--seeds", "1", "--jobs", "2", "--variants", "plain,PX,ACM",
        "--device", "cpu", "--output-dir", str(out), "SOLVER.MAX_ITER", "2",
    ]
    proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "comparison.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    # four tables (AP box, AP mask, label accuracy on the context categories, |cos(K, Q)|), each
    # with a header and one row per variant
    assert rows == ["variant", "plain", "PX", "ACM"] * 4
    assert "### Mean |cosine(K, Q)| on validation" in md
    assert "### AP box" in md and "### AP mask" in md and "### Label accuracy on the context categories" in md
    assert "| variant | context_label_acc |" in md
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    for col in ("AP", "context", "local", "lesion_emergency", "lesion_treated", "square", "triangle"):
        assert f" {col} |" in header
    assert "±" in md and "compare_backbones.py --quick --seeds 1" in md
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert sorted(r["variant"] for r in runs) == ["ACM", "PX", "plain"]
    cosine = {r["variant"]: r["metrics"].get("kq/mean_abs_cosine") for r in runs}
    assert cosine["plain"] is None and cosine["PX"] is None and 0.0 <= cosine["ACM"] <= 100.0  # only ACM has K and Q
    assert all(0.0 <= r["metrics"]["bbox/AP"] <= 100.0 for r in runs)
    assert all(0.0 <= r["metrics"]["context/label_acc"] <= 100.0 for r in runs)
    # a second call reuses the finished runs instead of training again
    again = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True)
    assert again.returncode == 0
    assert again.stderr.count("Reusing") == 3
