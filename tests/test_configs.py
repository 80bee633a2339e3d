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


# ------------------------------------------------ issue 26: acm_d2:// in a user's own _BASE_
SHIPPED = "Synthetic/mask_rcnn_R_18_FPN_acm.yaml"


def _user_configs(tmp_path, base=f"acm_d2://{SHIPPED}"):
    """mine.yaml -> (_BASE_) deeper/user.yaml -> (_BASE_) ``base``; returns mine.yaml."""
    (tmp_path / "deeper").mkdir(exist_ok=True)
    (tmp_path / "deeper" / "user.yaml").write_text(f'_BASE_: "{base}"\nSOLVER:\n  MAX_ITER: 7\n')
    mine = tmp_path / "mine.yaml"
    mine.write_text('_BASE_: ["deeper/user.yaml"]\nSOLVER:\n  BASE_LR: 0.005\n')
    return mine


def test_user_yaml_inherits_a_shipped_config_at_any_depth(tmp_path, monkeypatch):
    import detectron2.config

    import acm_d2.train_net
    from acm_d2 import get_acm_cfg, model_zoo
    from acm_d2.detectron2_tools import get_cfg_with_acm

    mine = _user_configs(tmp_path)
    expected = get_acm_cfg(f"acm_d2://{SHIPPED}", ["SOLVER.MAX_ITER", "7", "SOLVER.BASE_LR", "0.005"]).dump()
    assert get_acm_cfg(str(mine)).dump() == expected
    assert model_zoo.get_config(SHIPPED).MODEL.ACM.MODULE == "ACM"
    lazy = model_zoo.get_config("acm_d2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py")  # in a .py
    assert lazy.model.orth_loss_modules == "res5"
    cfg = get_cfg_with_acm()  # Detectron2's get_cfg() under python -m acm_d2.detectron2_tools
    cfg.merge_from_file(str(mine))
    assert cfg.dump() == expected
    # acm-d2-train-net / tools/train_net.py: the config is merged before the processes start
    launched = {}
    monkeypatch.setattr(acm_d2.train_net, "launch", lambda main, *a, **k: launched.update(k))
    monkeypatch.setattr("sys.argv", ["train_net.py", "--config-file", str(mine), "MODEL.DEVICE", "cpu"])
    acm_d2.train_net.invoke_main()
    assert launched["device"] == "cpu"
    assert detectron2.config.get_cfg is not get_cfg_with_acm  # nothing patched here

    # a name that is not shipped: refused, naming the file that names it and the close names
    _user_configs(tmp_path, base="acm_d2://Synthetic/mask_rcnn_R_18_FPN_ac.yaml")
    for merge in (lambda: get_acm_cfg(str(mine)), lambda: get_cfg_with_acm().merge_from_file(str(mine)),
                  acm_d2.train_net.invoke_main):
        with pytest.raises(ValueError) as info:
            merge()
        assert str(info.value).startswith(
            f"{tmp_path / 'deeper' / 'user.yaml'}: _BASE_ 'acm_d2://Synthetic/mask_rcnn_R_18_FPN_ac.yaml' is not a "
            f"config of acm-d2's model zoo. Close names: ['Synthetic/mask_rcnn_R_18_FPN_acm.yaml'"
        ), str(info.value)
