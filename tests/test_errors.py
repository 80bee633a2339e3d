"""Bad input fails early with a message that says what is wrong and what to do: configs,
checkpoint files, checkpoint shapes, and non-finite losses."""
import logging
import math
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.utils.events import EventStorage
from torch import nn

from acm_d2 import ACM
from acm_d2.engine import SafeCheckpointer, ACMShapeMismatchError, CheckedSimpleTrainer, CheckpointLoadError
from conftest import acm_cfg

SYNTHETIC = "configs/Base-RCNN-FPN-ACM.yaml"
SYNTHETIC_ABS = str(Path(__file__).resolve().parents[1] / SYNTHETIC)
# R-18 with FREEZE_AT 0: ACM in res2-res5 (64, 128, 256, 512 channels), 2 blocks each
SMALL = [
    "MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ACM.GROUPS", "8",
]


def backbone(*opts, config=SYNTHETIC):
    return build_backbone(acm_cfg(config, *SMALL, *opts), ShapeSpec(channels=3))


def error_of(*opts, config=SYNTHETIC, build=None):
    cfg = acm_cfg(config, *SMALL, *opts)
    with pytest.raises(ValueError) as info:
        (build or (lambda c: build_backbone(c, ShapeSpec(channels=3))))(cfg)
    return str(info.value)


# ------------------------------------------------------------------------------------ configs
def test_groups_not_dividing_a_stage():
    message = error_of("MODEL.ACM.GROUPS", "24")  # res2 has 64 channels: 24 does not divide 32
    assert "res2" in message and "channels=64" in message and "groups=24" in message
    assert "MODEL.ACM.GROUPS" in message and "Allowed groups" in message


def test_depth_that_is_no_resnet():
    message = error_of("MODEL.RESNETS.DEPTH", "42")
    assert "MODEL.RESNETS.DEPTH" in message and "42" in message and "[18, 34, 50, 101, 152]" in message


def test_c4_with_res5_asked():
    message = error_of(
        "MODEL.BACKBONE.NAME", "build_resnet_acm_backbone",
        "MODEL.RESNETS.OUT_FEATURES", "['res4']",
        "MODEL.ACM.STAGES", "['res4', 'res5']",
    )
    assert "['res5']" in message and "ROI heads" in message and "['res2', 'res3', 'res4']" in message


# -------------------------------------------------------------------------------- checkpoints
def _save(path, state):
    torch.save({"model": state}, path)
    return str(path)


def test_acm_shape_mismatch_is_reported_key_by_key(tmp_path):
    source = backbone()  # GROUPS 8
    path = _save(tmp_path / "g8.pth", source.state_dict())
    target = backbone("MODEL.ACM.GROUPS", "16")
    with pytest.raises(ACMShapeMismatchError) as info:
        SafeCheckpointer(target).load(path)
    message = str(info.value)
    n_acm = sum(isinstance(m, ACM) for m in target.modules())
    assert len(info.value.mismatches) == 3 * n_acm  # the kq_logits and both channel_gate weights
    assert "bottom_up.res2.0.context.kq_logits.weight: checkpoint (16, 8, 1, 1) vs model (32, 4, 1, 1)" in message
    assert "bottom_up.res5.1.context.channel_gate.0.weight: checkpoint (256, 64, 1, 1) vs model (256, 32, 1, 1)" in message
    assert "MODEL.ACM" in message


def test_other_shape_mismatch_keeps_detectron2_behaviour(tmp_path, caplog):
    source = backbone()
    state = source.state_dict()
    state["fpn_output2.bias"] = torch.zeros(3)  # e.g. a head of another size: skipped with a warning
    model = backbone()
    with caplog.at_level(logging.WARNING):
        SafeCheckpointer(model).load(_save(tmp_path / "x.pth", state))
    assert "fpn_output2.bias" in caplog.text
    assert torch.equal(model.state_dict()["bottom_up.res3.0.context.kq_logits.weight"], state["bottom_up.res3.0.context.kq_logits.weight"])


def test_imagenet_weights_report_only_acm_parameters_missing(tmp_path, monkeypatch):
    plain = backbone("MODEL.ACM.MODULE", "none").bottom_up
    # ImageNet weights as Detectron2's model zoo stores them: a .pkl of numpy arrays
    weights = {k: v.numpy() for k, v in plain.state_dict().items()}
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test", "matching_heuristics": True}, f)
    model = backbone().bottom_up
    checkpointer = SafeCheckpointer(model)
    reports = []
    monkeypatch.setattr(checkpointer, "_log_incompatible_keys", reports.append)
    checkpointer.load(str(path))
    (incompatible,) = reports
    acm_keys = {k for k in model.state_dict() if ".context." in k}
    assert acm_keys and set(incompatible.missing_keys) == acm_keys
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes


@pytest.fixture(scope="module")
def tiny_model():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_text_file_is_not_a_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "weights.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointLoadError, match="not a PyTorch or Detectron2 checkpoint") as info:
        SafeCheckpointer(tiny_model).load(str(path))
    assert str(path) in str(info.value)


def test_truncated_pth(tmp_path, tiny_model):
    path = tmp_path / "model_final.pth"
    torch.save({"model": tiny_model.state_dict(), "iteration": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="truncated") as info:
        SafeCheckpointer(tiny_model).load(str(path))
    assert str(path) in str(info.value)


def test_broken_pkl(tmp_path, tiny_model):
    path = tmp_path / "R-50.pkl"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointLoadError, match="not a Detectron2 / Caffe2 model-zoo .pkl"):
        SafeCheckpointer(tiny_model).load(str(path))


def test_missing_file(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SafeCheckpointer(tiny_model).load(str(tmp_path / "nope.pth"))


class _Arbitrary:  # a pickled object that weights_only refuses
    """An arbitrary class: a pickle holding an instance needs full unpickling."""


def test_pth_with_pickled_objects_is_refused(tmp_path, tiny_model):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": tiny_model.state_dict(), "extra": _Arbitrary()}, path)
    with pytest.raises(CheckpointLoadError, match="weights_only=True") as info:
        SafeCheckpointer(tiny_model).load(str(path))
    assert "arbitrary code" in str(info.value)


def test_not_a_state_dict(tmp_path, tiny_model):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointLoadError, match="not a checkpoint"):
        SafeCheckpointer(tiny_model).load(str(path))


# ---------------------------------------------------------------------------- non-finite loss
class _LossModel(nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.losses = losses

    def forward(self, batch):
        return {k: self.weight * v for k, v in self.losses.items()}


@pytest.mark.parametrize(
    "losses, words",
    [
        ({"loss_cls": 1.0, "loss_acm_orth": math.nan}, ["Non-finite terms: ['loss_acm_orth']", "the other terms are finite", "ORTH_LOSS_WEIGHT"]),
        ({"loss_cls": math.inf, "loss_acm_orth": 0.5}, ["Non-finite terms: ['loss_cls']", "loss_acm_orth (the ACM orthogonality loss) is finite (0.5)"]),
        ({"loss_cls": math.nan, "loss_acm_orth": math.inf}, ["['loss_acm_orth', 'loss_cls']", "and so are Detectron2's own terms"]),
        ({"loss_cls": math.nan}, ["loss_acm_orth is not in the loss dict"]),
    ],
)
def test_non_finite_loss_names_the_term(losses, words):
    model = _LossModel(losses)
    trainer = CheckedSimpleTrainer(model, [[{}]] * 3, torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(0), pytest.raises(FloatingPointError) as info:
        trainer.iter = 0
        trainer.run_step()
    message = str(info.value)
    assert message.startswith("Loss became infinite or NaN at iteration=0!")
    for w in words:
        assert w in message


# ------------------------------------------------------------------------- config files
def test_yaml_with_python_tags_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'_BASE_: "{SYNTHETIC_ABS}"\nMODEL:\n  WEIGHTS: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError, match="acm-d2 reads configs with yaml.safe_load only"):
        acm_cfg(str(config))
    assert not marker.exists()


def test_unregistered_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"MODEL.META_ARCHITECTURE 'WithACMOrthLoss' is not registered; registered names: "
                                         r"\[.*'ACMGeneralizedRCNN'.*\]"):
        acm_cfg(SYNTHETIC, "MODEL.META_ARCHITECTURE", "WithACMOrthLoss")


@pytest.mark.parametrize("key, value, expected", [
    ("SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD 0: expected a positive number of iterations"),
    ("SOLVER.CHECKPOINT_PERIOD", "-5", "SOLVER.CHECKPOINT_PERIOD -5: expected a positive number of iterations"),
    ("TEST.EVAL_PERIOD", "-1", r"TEST.EVAL_PERIOD -1: expected a number of iterations >= 0 \(0: evaluate only at the end"),
    ("VIS_PERIOD", "-20", r"VIS_PERIOD -20: expected a number of iterations >= 0 \(0: draw no training visualisations\)"),
])
def test_periods_detectron2_cannot_use_are_refused_naming_the_setting(key, value, expected):
    with pytest.raises(ValueError, match=expected):
        acm_cfg(SYNTHETIC, key, value)


def test_zero_eval_and_vis_periods_turn_them_off():
    cfg = acm_cfg(SYNTHETIC, "TEST.EVAL_PERIOD", "0", "VIS_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1")
    assert (cfg.TEST.EVAL_PERIOD, cfg.VIS_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD) == (0, 0, 1)


def test_train_net_refuses_a_zero_checkpoint_period_before_writing(tmp_path):
    """Detectron2 alone dies at iteration 0 with ZeroDivisionError; nothing of OUTPUT_DIR is made."""
    from acm_d2.train_net import argument_parser, main

    out = tmp_path / "run"
    args = argument_parser().parse_args(["--config-file", SYNTHETIC_ABS, "SOLVER.CHECKPOINT_PERIOD", "0", "OUTPUT_DIR", str(out)])
    with pytest.raises(ValueError, match="SOLVER.CHECKPOINT_PERIOD 0: expected a positive number of iterations"):
        main(args)
    assert not out.exists()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = _save(tmp_path / "other.pth", {"head.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointLoadError, match="None of the .* parameters and buffers of the model was found"):
        SafeCheckpointer(backbone()).load(path)


def test_evaluation_needs_every_parameter_from_the_checkpoint(tmp_path):
    """--eval-only's checkpointer (require_complete): ImageNet-like weights of the backbone
    alone, or a head of another shape, would leave random parameters and are refused."""
    source = backbone()
    state = source.state_dict()
    partial = {k: v for k, v in state.items() if k.startswith("bottom_up.")}
    with pytest.raises(CheckpointLoadError) as info:
        SafeCheckpointer(backbone(), require_complete=True).load(_save(tmp_path / "partial.pth", partial))
    n_missing = len([k for k in state if not k.startswith("bottom_up.") and not k.endswith("num_batches_tracked")])
    message = str(info.value)
    assert message.startswith(f"{n_missing} of the ")
    assert "they would keep their random initialisation" in message and "Check MODEL.WEIGHTS" in message
    other_shape = dict(state, **{"fpn_output2.bias": torch.zeros(3)})
    with pytest.raises(CheckpointLoadError, match=r"^1 of the .* not in the checkpoint or have other shapes \(e.g. \['fpn_output2.bias'\]\)"):
        SafeCheckpointer(backbone(), require_complete=True).load(_save(tmp_path / "other.pth", other_shape))
    model = backbone()
    SafeCheckpointer(model, require_complete=True).load(_save(tmp_path / "whole.pth", state))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    SafeCheckpointer(backbone()).load(_save(tmp_path / "partial.pth", partial))  # training from it is fine


@pytest.mark.parametrize(
    "where, words",
    [
        ("opts", "the command line: MODEL.ACM.META_ARCHITECTURE is not a config key; MODEL.ACM has: ['AFTER_BLOCKS', "),
        ("yaml", "evil.yaml: MODEL.ACM.META_ARCHITECTURE is not a config key; MODEL.ACM has: ['AFTER_BLOCKS', "),
    ],
)
def test_unknown_key_names_the_section_and_the_key_meant(tmp_path, where, words):
    if where == "yaml":
        config = tmp_path / "evil.yaml"
        config.write_text(f'_BASE_: "{SYNTHETIC_ABS}"\nMODEL:\n  ACM:\n    META_ARCHITECTURE: "Nothing"\n')
        call = lambda: acm_cfg(str(config))  # noqa: E731
    else:
        call = lambda: acm_cfg(SYNTHETIC, "MODEL.ACM.META_ARCHITECTURE", "Nothing")  # noqa: E731
    with pytest.raises(ValueError) as info:
        call()
    assert words in str(info.value)
    assert str(info.value).endswith("'VARIANT']. Did you mean MODEL.META_ARCHITECTURE?")
