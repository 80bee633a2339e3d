"""No file read by acm-d2 runs code (.pkl weights through a restricted unpickler),
--resume loads only checkpoints of OUTPUT_DIR, a full disk and a diverging RPN say so, and
the number of classes must fit the datasets."""
import errno
import logging
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.utils.events import EventStorage
from torch import nn

from acm_d2.checkpoint import CheckpointLoadError, UnsafeCheckpointError, load_checkpoint_file, safe_torch_load
from acm_d2.data import check_num_classes
from acm_d2.engine import CheckedSimpleTrainer, SafeCheckpointer
from acm_d2.engine import checkpointer as checkpointer_module
from acm_d2.engine.checkpointer import CheckpointSaveError
from conftest import acm_cfg


class _Payload:
    """Unpickling it creates the file ``marker``: proof that code from a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _hostile_file(path: Path):
    """A torch file with a valid state dict and a payload; returns the payload's marker."""
    marker = path.parent / f"{path.name}.ran"
    torch.save({"model": _model().state_dict(), "model_state": {}, "x": _Payload(marker)}, path)
    return marker


# ------------------------------------------------------------------------ loading runs no code
@pytest.mark.parametrize("name", ["weights.pth", "weights.pyth", "weights.pt", "weights"])
@pytest.mark.parametrize("force_unsafe", [False, True])
def test_no_extension_loads_a_payload(tmp_path, monkeypatch, name, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / name
    marker = _hostile_file(path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True") as info:
        SafeCheckpointer(_model()).load(str(path))
    assert str(path) in str(info.value) and "--trust-pickle" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_torch_that_ignores_weights_only_is_refused(tmp_path, monkeypatch):
    """An older torch where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides weights_only=True."""
    real_load = torch.load

    def overridden_load(f, *args, weights_only=None, **kwargs):
        return real_load(f, *args, weights_only=False, **kwargs)

    path = tmp_path / "model.pth"
    marker = _hostile_file(path)
    monkeypatch.setattr(torch, "load", overridden_load)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "true")
    for load in (lambda: SafeCheckpointer(_model()).load(str(path)), lambda: safe_torch_load(str(path))):
        with pytest.raises(CheckpointLoadError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set") as info:
            load()
        assert f"Refusing to load {path}" in str(info.value)
        assert "Unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in str(info.value)
    assert not marker.exists()


def test_pycls_pyth_loads_safely(tmp_path):
    model = _model()
    torch.save({"model_state": model.state_dict(), "epoch": 3}, tmp_path / "pycls.pyth")
    target = _model()
    SafeCheckpointer(target).load(str(tmp_path / "pycls.pyth"))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({"weights": model.state_dict()}, tmp_path / "other.pyth")
    with pytest.raises(CheckpointLoadError, match="'model_state'; this file has dict with keys \\['weights'\\]"):
        SafeCheckpointer(target).load(str(tmp_path / "other.pyth"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pkl_loads_without_running_code(tmp_path, protocol):
    model = _model()
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    zoo, caffe2 = tmp_path / "zoo.pkl", tmp_path / "caffe2.pkl"
    zoo.write_bytes(pickle.dumps({"model": arrays, "__author__": "me", "step": [1, 2.0, "x"]}, protocol=protocol))
    caffe2.write_bytes(pickle.dumps({"blobs": dict(arrays, **{"0.weight_momentum": arrays["0.weight"]})}, protocol=protocol))
    for path in (zoo, caffe2):
        target = _model()
        SafeCheckpointer(target).load(str(path))
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in model.state_dict().items())


def test_pkl_with_anything_else_is_refused_naming_the_class(tmp_path, monkeypatch):
    """Also where iopath serves it from its download cache (a planted file under the path of
    detectron2://ImageNetPretrained/MSRA/R-50.pkl)."""
    from iopath.common.file_io import PathManager as PathManagerBase
    from detectron2.utils.file_io import PathManager

    cache = tmp_path / "iopath_cache" / "detectron2" / "ImageNetPretrained" / "MSRA"
    cache.mkdir(parents=True)
    marker = tmp_path / "ran"
    planted = cache / "R-50.pkl"
    planted.write_bytes(pickle.dumps({"model": {"0.weight": _Payload(marker)}, "__author__": "x"}, protocol=2))
    monkeypatch.setattr(type(PathManager), "get_local_path", lambda self, path, **kw: str(planted) if "://" in path else path)
    with pytest.raises(UnsafeCheckpointError) as info:
        SafeCheckpointer(_model()).load("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    assert str(info.value).startswith(f"Refusing to load {planted}: the pickle wants to load io.open, which a Detectron2 / Caffe2 model-zoo .pkl never holds")
    assert not marker.exists()
    (tmp_path / "text.pkl").write_text("not a pickle")
    with pytest.raises(CheckpointLoadError, match="text.pkl: not a Detectron2 / Caffe2 model-zoo .pkl file"):
        SafeCheckpointer(_model()).load(str(tmp_path / "text.pkl"))


# ------------------------------------------------------------- --resume follows last_checkpoint
@pytest.mark.parametrize(
    "named", ["../elsewhere/model_final.pth", "/tmp/model_final.pth", "model_final.pkl", "model_final.pyth", "sub/m.pth", ".."]
)
def test_resume_loads_only_a_pth_of_output_dir(tmp_path, named):
    out = tmp_path / "out"
    ckpt = SafeCheckpointer(_model(), str(out))
    ckpt.save("model_0000004", iteration=4)
    (out / "last_checkpoint").write_text(named)
    with pytest.raises(CheckpointLoadError) as info:
        ckpt.resume_or_load("", resume=True)
    message = str(info.value)
    assert f"{out / 'last_checkpoint'} names {named!r}" in message
    assert "not the file name of a .pth checkpoint" in message and "['model_0000004.pth']" in message
    assert "delete last_checkpoint to start from MODEL.WEIGHTS" in message

    (out / "last_checkpoint").write_text("model_0000004.pth\n")
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 4


# ------------------------------------------------------------------------------ full disk
def test_full_disk_names_file_and_space(tmp_path, monkeypatch):
    model = _model()
    ckpt = SafeCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def full_disk_save(obj, f, *args, **kwargs):  # what torch.save raises on ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpointer_module.torch, "save", full_disk_save)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save("model_0000003", iteration=3)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"Disk full: no space left on the device of {tmp_path}" in message
    assert f"checkpoint {tmp_path / 'model_0000003.pth'}" in message
    size = sum(p.numel() * 4 for p in model.parameters())
    assert f"needs about {size / 2**20:.1f} MiB" in message and "MiB are free there" in message
    assert "model_0000001.pth is intact" in message and "--resume" in message
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "model_0000001.pth").read_bytes() == before

    def other_error(obj, f, *args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(checkpointer_module.torch, "save", other_error)
    with pytest.raises(RuntimeError, match="^some other failure$"):
        ckpt.save("model_0000003", iteration=3)


# -------------------------------------------------------------------------- diverging RPN
class _DivergingRPN(nn.Module):
    """Detectron2's proposal selection on the RPN's output, which is non-finite."""

    def __init__(self, nan_weight: bool):
        super().__init__()
        self.head = nn.Linear(4, 4)
        self.context = nn.Module()
        self.context.gate = nn.Linear(2, 2)
        if nan_weight:
            with torch.no_grad():
                self.context.gate.weight[0, 0] = math.nan

    def forward(self, batch):
        boxes = self.head(torch.ones(1, 4)) * math.inf
        find_top_rpn_proposals([boxes.reshape(1, 1, 4)], [torch.ones(1, 1)], [(8, 8)], 0.7, 10, 10, 0.0, True)
        return {"loss": self.head.weight.sum()}


@pytest.mark.parametrize("nan_weight", [True, False])
def test_diverging_rpn_says_what_to_change(nan_weight):
    model = _DivergingRPN(nan_weight)
    trainer = CheckedSimpleTrainer(model, [[{}]] * 3, torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(6) as storage, pytest.raises(FloatingPointError) as info:
        storage.put_scalars(loss_cls=0.5, loss_rpn_loc=2.5e5, total_loss=2.5e5 + 0.5, lr=0.02)  # iteration 6's
        trainer.iter = 7
        trainer.run_step()
    message = str(info.value)
    assert message.startswith("Training diverged at iteration=7: the RPN predicted non-finite boxes")
    assert "Loss terms of the last logged iteration, the largest first: total_loss=2.5e+05, loss_rpn_loc=2.5e+05, loss_cls=0.5\n" in message
    assert "Predicted boxes or scores contain Inf/NaN" in message
    for setting in ("SOLVER.BASE_LR", "SOLVER.WARMUP_ITERS", "SOLVER.CLIP_GRADIENTS.ENABLED", "--resume"):
        assert setting in message
    if nan_weight:
        assert "1 of 4 parameter tensors are non-finite (e.g. ['context.gate.weight']), 1 of them in context modules" in message
    else:
        assert "Every parameter is finite: the activations overflowed" in message


# ---------------------------------------------------------------------------- NUM_CLASSES
def test_num_classes_must_cover_the_categories(caplog):
    name = "test_safety_three_classes"
    MetadataCatalog.get(name).thing_classes = ["a", "b", "c"]
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", "DATASETS.TRAIN", f"('{name}',)", "MODEL.ROI_HEADS.NUM_CLASSES", "2")
    with pytest.raises(ValueError) as info:
        check_num_classes(cfg)
    assert str(info.value) == (
        f"MODEL.ROI_HEADS.NUM_CLASSES=2, but DATASETS.TRAIN ['{name}'] have more categories: '{name}' has 3 "
        f"('a', 'b', 'c'). The model would train the categories beyond 2 as background (or fail in the loss). "
        f"Set MODEL.ROI_HEADS.NUM_CLASSES 3."
    )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    check_num_classes(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    with caplog.at_level(logging.WARNING):
        check_num_classes(cfg)
    assert "2 classes of the model are never trained" in caplog.text

    retina = acm_cfg("configs/Base-RetinaNet.yaml", "DATASETS.TRAIN", f"('{name}',)", "MODEL.RETINANET.NUM_CLASSES", "1")
    with pytest.raises(ValueError, match="^MODEL.RETINANET.NUM_CLASSES=1, .* Set MODEL.RETINANET.NUM_CLASSES 3.$"):
        check_num_classes(retina)
    check_num_classes(retina, dataset_names=[])  # nothing to check against


def test_num_classes_checked_once_the_datasets_are_loaded(tmp_path):
    """A dataset registered with Detectron2's register_coco_instances(name, {}, ...) has its
    categories only once loaded: the trainer checks it then, before the first iteration."""
    from detectron2.data.datasets import register_coco_instances

    from acm_d2.engine import ResumableTrainer
    from train_net_runs import tiny_opts, write_tiny_coco

    json_file, image_root = write_tiny_coco(tmp_path / "data", num_images=2, size=32)
    name = "test_safety_detectron2_registered"
    register_coco_instances(name, {}, json_file, image_root)
    opts = tiny_opts(tmp_path / "out", max_iter=1, dataset=name)
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", *opts, "MODEL.ROI_HEADS.NUM_CLASSES", "1")
    with pytest.raises(ValueError) as info:
        ResumableTrainer(cfg)
    assert str(info.value) == (
        f"MODEL.ROI_HEADS.NUM_CLASSES=1, but the datasets ['{name}'] have more categories: '{name}' has 2 "
        f"('red', 'green'). The model would train the categories beyond 1 as background (or fail in the loss). "
        f"Set MODEL.ROI_HEADS.NUM_CLASSES 2."
    )


# ------------------------------------------------ Detectron2's own scripts (acm_d2.detectron2_tools)
_DETECTRON2_SCRIPT = """
import json, sys
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg

results = {}
for name, load in [
    ("merge_from_file", lambda: get_cfg().merge_from_file(sys.argv[1])),
    ("LazyConfig.load", lambda: LazyConfig.load(sys.argv[1])),
    ("DetectionCheckpointer", lambda: DetectionCheckpointer(torch.nn.Linear(3, 4)).load(sys.argv[2])),
]:
    try:
        load()
        results[name] = "loaded"
    except Exception as e:
        results[name] = f"{type(e).__name__}: {e}"
print(json.dumps(results))
"""


def test_detectron2_scripts_read_yaml_and_weights_safely(tmp_path):
    """python -m acm_d2.detectron2_tools SCRIPT: Detectron2's get_cfg().merge_from_file and
    LazyConfig.load refuse Python tags, DetectionCheckpointer loads with weights_only also
    with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set."""
    import json
    import subprocess
    import sys

    from train_net_runs import REPO

    yaml_marker = tmp_path / "yaml.ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'MODEL:\n  WEIGHTS: !!python/object/apply:builtins.open ["{yaml_marker}", "w"]\n')
    weights = tmp_path / "weights.pth"
    weights_marker = _hostile_file(weights)
    script = tmp_path / "script.py"
    script.write_text(_DETECTRON2_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "acm_d2.detectron2_tools", str(script), str(config), str(weights)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    refused = f"ValueError: {config}: the YAML config has a tag that would construct Python objects"
    assert results["merge_from_file"].startswith(refused)
    assert results["LazyConfig.load"].startswith(refused)
    assert results["DetectionCheckpointer"].startswith(f"UnsafeCheckpointError: {weights} cannot be loaded with torch.load(weights_only=True)")
    assert not yaml_marker.exists() and not weights_marker.exists()
