"""`python -m acm_d2.detectron2_tools SCRIPT ...` runs Detectron2's own scripts with ACM configs.

Detectron2's tools/ are not part of its pip package; the stand-in below does what the start of
its ``tools/analyze_model.py`` does (``get_cfg()``, ``merge_from_file``, ``build_model``,
``FlopCountAnalysis``), which is where ACM configs used to fail.
"""
import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

from acm_d2.detectron2_tools import run_script

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


def test_run_script_runs_as_python_script_does(tmp_path):
    """The script's folder first on sys.path (a sibling imports), __file__, sys.argv[0], run as
    __main__; sys.argv and sys.path restored, the sibling forgotten afterwards."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "acm_d2_sibling_helper.py").write_text("VALUE = 41\n")
    out = tmp_path / "out.json"
    script = folder / "tool.py"
    script.write_text(
        "import json, sys\n"
        "from acm_d2_sibling_helper import VALUE\n"
        "if __name__ == '__main__':\n"
        f"    json.dump({{'value': VALUE + 1, 'file': __file__, 'argv': sys.argv, 'path0': sys.path[0]}}, open({str(out)!r}, 'w'))\n"
    )
    argv, path = list(sys.argv), list(sys.path)
    run_script(str(script), ["--config-file", "x.yaml"])
    result = json.loads(out.read_text())
    assert result == {"value": 42, "file": str(script), "argv": [str(script), "--config-file", "x.yaml"],
                      "path0": str(folder)}
    assert sys.argv == argv and sys.path == path and "acm_d2_sibling_helper" not in sys.modules
    with pytest.raises(FileNotFoundError, match="no such script"):
        run_script(str(folder / "missing.py"))


# Detectron2's demo/demo.py in miniature: its first lines (get_cfg, merge_from_file, the sibling
# import ``from predictor import VisualizationDemo``) and predictor.py's DefaultPredictor.
DEMO = '''
import argparse, json
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image
from predictor import VisualizationDemo

parser = argparse.ArgumentParser()
parser.add_argument("--config-file")
parser.add_argument("--input")
parser.add_argument("--output")
parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
args = parser.parse_args()
cfg = get_cfg()
cfg.merge_from_file(args.config_file)
cfg.merge_from_list(args.opts)
cfg.freeze()
predictions = VisualizationDemo(cfg).run_on_image(read_image(args.input, format="BGR"))
instances = predictions["instances"]
json.dump({"meta": cfg.MODEL.META_ARCHITECTURE, "size": list(instances.image_size), "n": len(instances)},
          open(args.output, "w"))
'''
PREDICTOR = '''
from detectron2.engine.defaults import DefaultPredictor


class VisualizationDemo:
    def __init__(self, cfg):
        self.predictor = DefaultPredictor(cfg)

    def run_on_image(self, image):
        return self.predictor(image)
'''


def test_detectron2_demo_imports_its_sibling_predictor(tmp_path):
    """``python -m acm_d2.detectron2_tools PATH/demo/demo.py`` from another folder: the demo's
    ``from predictor import ...`` resolves as with ``python PATH/demo/demo.py``."""
    import numpy as np
    from PIL import Image

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.py").write_text(DEMO)
    (demo / "predictor.py").write_text(PREDICTOR)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "acm_d2.detectron2_tools", str(demo / "demo.py"), "--config-file",
         "acm_d2://Synthetic/mask_rcnn_R_18_FPN_acm.yaml",
         "--input", str(image), "--output", str(out), "--opts", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "64", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"] == "ACMGeneralizedRCNN" and result["size"] == [48, 64] and result["n"] > 0
