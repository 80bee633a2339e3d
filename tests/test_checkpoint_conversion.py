"""The authors' checkpoint layout -> acm_d2's: whole models, single modules, the CLI, errors."""
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from detectron2.engine import DefaultPredictor

from acm_d2 import ACM, ReferenceACM, acm_modules
from acm_d2.authors_layout import CheckpointConversionError, convert_official_state_dict, to_official_state_dict
from acm_d2.checkpoint import CheckpointLoadError, load_checkpoint_file
from conftest import acm_cfg

ROOT = Path(__file__).resolve().parents[1]
# Mask R-CNN R-50 FPN + ACM of the 1x YAML: ACM in res3-res5 (13 modules, G = 32).
R50_CONFIG = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml"
# The tiny R-18 model: ACM in all 8 BasicBlocks, G = 16.
TINY_CONFIG = "configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml"


def official_acm_tensors(prefix, channels, groups, generator):
    """The 8 tensors of one of the authors' modules, from the documented names and shapes."""
    shapes = {
        "add_mod.map_gen.0.weight": (groups, channels // groups, 1, 1),
        "add_mod.map_gen.0.bias": (groups,),
        "sub_mod.map_gen.0.weight": (groups, channels // groups, 1, 1),
        "sub_mod.map_gen.0.bias": (groups,),
        "mul_mod.feature_gen.0.weight": (channels // 2, channels // groups, 1, 1),
        "mul_mod.feature_gen.0.bias": (channels // 2,),
        "mul_mod.feature_gen.2.weight": (channels, channels // (2 * groups), 1, 1),
        "mul_mod.feature_gen.2.bias": (channels,),
    }
    return OrderedDict(
        (f"{prefix}module.{name}", 0.1 * torch.randn(shape, generator=generator)) for name, shape in shapes.items()
    )


def official_state_dict(model, seed=0):
    """The model's state dict with every ACM replaced by random tensors in the authors' layout."""
    generator = torch.Generator().manual_seed(seed)
    result = OrderedDict()
    blocks = acm_modules(model)
    done = set()
    for key, value in model.state_dict().items():
        if ".context." not in key:
            result[key] = value.clone()
            continue
        block = key.split(".context.")[0]
        if block not in done:
            module = blocks[block.rsplit("bottom_up.", 1)[1]]
            result.update(official_acm_tensors(f"{block}.", module.channels, module.groups, generator))
            done.add(block)
    return result


@pytest.fixture(scope="module")
def r50_model():
    return build_model(acm_cfg(R50_CONFIG, "MODEL.WEIGHTS", ""))


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(acm_cfg(TINY_CONFIG)).eval()


def check_loaded_from_official(model, official):
    """Every ACM of ``model`` holds the authors' tensors: rows 2g of kq_logits are K
    (add_mod), rows 2g + 1 are Q (sub_mod); the gate is mul_mod; the map biases are gone."""
    for block, acm in acm_modules(model, qualified=True).items():
        prefix = f"{block}.module."
        assert torch.equal(acm.kq_logits.weight[0::2], official[prefix + "add_mod.map_gen.0.weight"])
        assert torch.equal(acm.kq_logits.weight[1::2], official[prefix + "sub_mod.map_gen.0.weight"])
        assert torch.equal(acm.channel_gate[0].bias, official[prefix + "mul_mod.feature_gen.0.bias"])
        assert torch.equal(acm.channel_gate[2].weight, official[prefix + "mul_mod.feature_gen.2.weight"])
    plain = {k: v for k, v in official.items() if ".module." not in k}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.items())


def test_every_loader_converts_the_authors_layout(tmp_path, r50_model):
    """model.load_state_dict, Detectron2's DetectionCheckpointer and DefaultPredictor: one loader."""
    official = official_state_dict(r50_model)
    assert official["backbone.bottom_up.res3.0.module.add_mod.map_gen.0.weight"].shape == (32, 16, 1, 1)
    incompatible = r50_model.load_state_dict(official, strict=True)  # nothing missing, nothing unexpected
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    check_loaded_from_official(r50_model, official)

    tiny = build_model(acm_cfg(TINY_CONFIG))
    official = official_state_dict(tiny, seed=5)
    path = tmp_path / "authors.pth"
    torch.save({"model": official, "__author__": "ACM authors"}, path)
    model = build_model(acm_cfg(TINY_CONFIG))
    DetectionCheckpointer(model).load(str(path))
    check_loaded_from_official(model, official)
    predictor = DefaultPredictor(acm_cfg(TINY_CONFIG, "MODEL.WEIGHTS", str(path)))
    check_loaded_from_official(predictor.model, official)


def test_converted_module_computes_the_reference_output():
    torch.manual_seed(0)
    reference = ReferenceACM(64, groups=8)
    for parameter in reference.parameters():  # random biases too, not the zero init
        torch.nn.init.normal_(parameter, std=0.2)
    converted, report = convert_official_state_dict(OrderedDict((f"module.{k}", v) for k, v in reference.state_dict().items()))
    assert report.converted == {"<top level>": (64, 8)}
    module = ACM(64, groups=8)
    module.load_state_dict(OrderedDict((k[len("context."):], v) for k, v in converted.items()), strict=True)
    x = torch.randn(2, 64, 7, 9)
    y_ref, orth_ref = reference(x)
    y, orthogonality = module.forward_with_orthogonality(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(orthogonality, orth_ref, atol=1e-5, rtol=1e-5)
    back = to_official_state_dict(OrderedDict((f"context.{k}", v) for k, v in module.state_dict().items()))
    for key, value in reference.state_dict().items():
        expected = torch.zeros_like(value) if key.endswith("map_gen.0.bias") else value  # the map biases change nothing
        torch.testing.assert_close(back[f"module.{key}"], expected, atol=0, rtol=0)


def test_plain_keys_pass_through_in_order():
    generator = torch.Generator().manual_seed(1)
    state = OrderedDict([("a.weight", torch.zeros(1))])
    state.update(official_acm_tensors("backbone.bottom_up.res3.0.", 32, 4, generator))
    state["z.bias"] = torch.ones(2)
    converted, report = convert_official_state_dict(state)
    assert list(converted) == [
        "a.weight",
        "backbone.bottom_up.res3.0.context.kq_logits.weight",
        "backbone.bottom_up.res3.0.context.channel_gate.0.weight",
        "backbone.bottom_up.res3.0.context.channel_gate.0.bias",
        "backbone.bottom_up.res3.0.context.channel_gate.2.weight",
        "backbone.bottom_up.res3.0.context.channel_gate.2.bias",
        "z.bias",
    ]
    assert report.passed_through == 2


def _broken(kind):
    generator = torch.Generator().manual_seed(2)
    state = official_acm_tensors("backbone.bottom_up.res3.0.", 64, 8, generator)
    state.update(official_acm_tensors("backbone.bottom_up.res3.1.", 64, 8, generator))
    if kind == "incomplete":
        del state["backbone.bottom_up.res3.1.module.mul_mod.feature_gen.2.bias"]
    elif kind == "unknown":
        state["backbone.bottom_up.res3.1.module.add_mod.map_gen.1.weight"] = torch.zeros(1)
    elif kind == "shape":
        state["backbone.bottom_up.res3.1.module.sub_mod.map_gen.0.weight"] = torch.zeros(16, 4, 1, 1)
    return state


@pytest.mark.parametrize(
    "kind, words",
    [
        ("incomplete", ["incomplete", "res3.1", "mul_mod.feature_gen.2.bias"]),
        ("unknown", ["unmapped", "add_mod.map_gen.1.weight"]),
        ("shape", ["shape", "sub_mod.map_gen.0.weight", "(16, 4, 1, 1)", "C=64, G=8"]),
    ],
)
def test_errors_are_reported(kind, words):
    with pytest.raises(CheckpointConversionError) as info:
        convert_official_state_dict(_broken(kind))
    for word in words:
        assert word in str(info.value)
    assert list(info.value.report.converted) == ["backbone.bottom_up.res3.0"]
    converted, report = convert_official_state_dict(_broken(kind), strict=False)
    assert not report.ok
    assert not any(k.startswith("backbone.bottom_up.res3.1.") for k in converted)
    assert "backbone.bottom_up.res3.0.context.kq_logits.weight" in converted


class _Opaque:
    """An arbitrary class: a pickle holding an instance needs full unpickling."""


def test_load_checkpoint_file(tmp_path):
    state = OrderedDict([("w", torch.ones(2))])
    torch.save(state, tmp_path / "bare.pth")
    torch.save({"model": state, "__author__": "ACM authors", "matching_heuristics": False}, tmp_path / "d2.pth")
    assert list(load_checkpoint_file(str(tmp_path / "bare.pth"))) == ["w"]
    assert list(load_checkpoint_file(str(tmp_path / "d2.pth"))) == ["w"]

    torch.save({"model": state, "extra": _Opaque()}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointLoadError, match="weights_only=True"):
        load_checkpoint_file(str(tmp_path / "objects.pth"))
    assert list(load_checkpoint_file(str(tmp_path / "objects.pth"), trust_pickle=True)) == ["w"]

    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": {}}, f)
    with pytest.raises(CheckpointLoadError, match="DetectionCheckpointer"):
        load_checkpoint_file(str(tmp_path / "zoo.pkl"))
    with pytest.raises(CheckpointLoadError, match="no such file"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))


def _run_tool(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_official_checkpoint.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_round_trip(tmp_path, tiny_model):
    official = official_state_dict(tiny_model, seed=3)
    torch.save({"model": official, "__author__": "ACM authors"}, tmp_path / "official.pth")
    out = tmp_path / "converted.pth"
    done = _run_tool(tmp_path / "official.pth", out, "--config-file", TINY_CONFIG)
    assert done.returncode == 0, done.stderr
    assert "converted 8 ACM modules" in done.stdout
    assert "0 missing from the file (0 of them ACM), 0 not in the model (0 ACM), 0 with other shapes" in done.stdout

    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model"}
    model = build_model(acm_cfg(TINY_CONFIG))
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model({"model": dict(saved["model"])})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    checkpointer.load(str(out))  # the path tools/train_net.py takes for MODEL.WEIGHTS
    expected = convert_official_state_dict(official)[0]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0)


@pytest.mark.slow
def test_cli_checks_against_config_and_refuses_broken_files(tmp_path, tiny_model):
    torch.save({"model": official_state_dict(tiny_model, seed=4)}, tmp_path / "official.pth")
    # the same weights against a model with 8 groups instead of 16: every ACM tensor mismatches
    done = _run_tool(tmp_path / "official.pth", tmp_path / "b.pth", "--config-file", TINY_CONFIG, "MODEL.ACM.GROUPS", "8")
    assert done.returncode == 1
    assert "shape mismatch:   backbone.bottom_up.res2.0.context.kq_logits.weight: file (32, 4, 1, 1), model (16, 8, 1, 1)" in done.stdout
    assert "not written" in done.stderr and not os.path.exists(tmp_path / "b.pth")

    torch.save({"model": _broken("incomplete")}, tmp_path / "broken.pth")
    done = _run_tool(tmp_path / "broken.pth", tmp_path / "out.pth")
    assert done.returncode == 1 and not os.path.exists(tmp_path / "out.pth")
    assert "incomplete ACM at 'backbone.bottom_up.res3.1'" in done.stderr and "mul_mod.feature_gen.2.bias" in done.stderr
