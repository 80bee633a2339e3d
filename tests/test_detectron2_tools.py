"""`python -m acm_d2.detectron2_tools SCRIPT ...` runs Detectron2's own scripts with ACM configs.

Detectron2's tools/ are not part of its pip package; the stand-in below does what the start of
its ``tools/analyze_model.py`` does (``get_cfg()``, ``merge_from_file``, ``build_model``,
``FlopCountAnalysis``), which is where ACM configs used to fail.
"""
import json
import subprocess
import sys

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = '''
import json, sys
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis

args = default_argument_parser().parse_args()
cfg = get_cfg()
cfg.merge_from_file(args.config_file)
cfg.merge_from_list(args.opts)
model = build_model(cfg).eval()
flops = FlopCountAnalysis(model.backbone, torch.randn(1, 3, 64, 64))
flops.unsupported_ops_warnings(False)
acm = sum(v for k, v in flops.by_module().items() if k.endswith(".context"))
print(json.dumps({"meta": type(model).__name__, "unsupported": sorted(flops.unsupported_ops()), "acm": acm}))
'''
ARGS = ["--config-file", "configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml", "MODEL.DEVICE", "cpu"]


def run(tmp_path, *command):
    script = tmp_path / "analyze_model.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, *command, str(script), *ARGS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_detectron2_script_runs_with_acm_config_and_counts_acm_flops(tmp_path):
    plain = run(tmp_path)
    assert plain.returncode != 0 and "Non-existent config key: MODEL.ACM" in plain.stderr
    done = run(tmp_path, "-m", "acm_d2.detectron2_tools")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["meta"] == "ACMGeneralizedRCNN"
    assert result["acm"] > 0 and not {"aten::mean", "aten::addcmul", "aten::baddbmm"} & set(result["unsupported"])
