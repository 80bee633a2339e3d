"""Every YAML config in configs/ merges and builds its model (no weights downloaded)."""
import glob

import pytest
from detectron2.modeling import build_model

from acm_d2 import ACM, CONTEXT_MODULE_REGISTRY
from acm_d2.modeling import context_modules
from conftest import acm_cfg

YAMLS = sorted(glob.glob("configs/**/*.yaml", recursive=True))


def test_configs_found():
    assert len(YAMLS) >= 35
    for backbone in ("R_50", "R_101", "X_101_32x8d"):  # every row of the paper's Table 6, and GC, CBAM
        for suffix in ("", "_se", "_nl", "_cc", "_gc", "_cbam", "_acm"):
            assert f"configs/COCO-InstanceSegmentation/mask_rcnn_{backbone}_FPN_1x{suffix}.yaml" in YAMLS


#: (depth, FREEZE_AT) -> blocks of the trained stages (residual modules), and the block an
#: after-block module (NL, CC) follows by default: the one before res4's last.
TRAINED_BLOCKS = {(50, 2): 13, (101, 2): 30, (18, 0): 8}
AFTER_BLOCK = {50: "res4.4", 101: "res4.21", 18: "res4.0"}


@pytest.mark.parametrize("path", YAMLS)
def test_config_builds(path):
    cfg = acm_cfg(path)
    model = build_model(cfg)
    modules = context_modules(model)
    kind = cfg.MODEL.ACM.MODULE if cfg.MODEL.BACKBONE.NAME.endswith("_acm_backbone") else "none"
    depth, freeze_at = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.BACKBONE.FREEZE_AT
    if kind == "none":
        assert not modules
    elif kind in ("NL", "CC"):
        assert list(modules) == [f"{AFTER_BLOCK[depth]}.context_after"]
    else:
        assert len(modules) == TRAINED_BLOCKS[(depth, freeze_at)]
        assert all(name.endswith(".context") for name in modules)
    assert all(type(m) is CONTEXT_MODULE_REGISTRY.get(kind) for m in modules.values())
    suffix = {"ACM": "_acm", "SE": "_se", "NL": "_nl", "CC": "_cc", "GC": "_gc", "CBAM": "_cbam"}
    if "COCO" in path:  # the model-zoo names say the module
        assert path.endswith(f"{suffix[kind]}.yaml") if kind != "none" else not any(
            path.endswith(f"{s}.yaml") for s in suffix.values())
    acm = sum(isinstance(m, ACM) for m in model.modules())
    if kind == "ACM":
        assert type(model).__name__ in ("ACMGeneralizedRCNN", "ACMRetinaNet")
        # the COCO configs reproduce the authors' Detectron2 objective; the built-in data's the paper's
        assert model.orth_loss_modules == ("all" if "Synthetic" in path else "res5")
    else:
        assert acm == 0
    if "COCO" in path:
        assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.INPUT.MIN_SIZE_TEST == 800
        assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/")
        one_x = "_1x" in path
        assert cfg.SOLVER.MAX_ITER == (90000 if one_x else 270000)
        assert tuple(cfg.SOLVER.STEPS) == ((60000, 80000) if one_x else (210000, 250000))
