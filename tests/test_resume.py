"""Nothing is lost: a killed run resumes to the weights of an uninterrupted one (with the
built-in configs' NUM_WORKERS 1), the data stream resumes exactly, checkpoints are written
atomically and load with weights_only=True, and a run killed while writing model_final.pth
gets it on --resume."""
import os
import signal
import subprocess
import time

import pytest
import torch
from detectron2.data.common import AspectRatioGroupedDataset
from torch import nn

from acm_d2.engine import SafeCheckpointer, ResumableTrainingSampler
from acm_d2.engine import checkpointer as checkpointer_module
from train_net_runs import REPO, load_model_weights, run_train_net, tiny_opts, train_net_command, write_tiny_coco


# ----------------------------------------------------------------------------- data stream
def _batches(sampler, groups, batch_size, count):
    """The first ``count`` batches of AspectRatioGroupedDataset over the sampler's stream."""
    items = ({"width": 2 - g, "height": 1, "key": key} for key in sampler for g in [groups[key[1]]])
    grouped = AspectRatioGroupedDataset(items, batch_size)
    out = []
    for batch in grouped:
        out.append([d["key"] for d in batch])
        if len(out) == count:
            return out


@pytest.mark.parametrize("grouping", [False, True])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_sampler_resumes_the_same_batches(monkeypatch, grouping, rank, world_size):
    monkeypatch.setattr("detectron2.utils.comm.get_rank", lambda: rank)
    monkeypatch.setattr("detectron2.utils.comm.get_world_size", lambda: world_size)
    size, batch_size = 11, 3
    groups = [int(i % 3 == 0) for i in range(size)]  # two aspect-ratio groups
    aspect = groups if grouping else None

    full = _batches(ResumableTrainingSampler(size, seed=5, aspect_groups=aspect), groups if grouping else [0] * size, batch_size, 20)
    for start in (1, 4, 7, 13):
        sampler = ResumableTrainingSampler(size, seed=5, aspect_groups=aspect)
        sampler.resume(start, batch_size)
        resumed = _batches(sampler, groups if grouping else [0] * size, batch_size, 20 - start)
        assert resumed == full[start:], f"resumed at {start}"
    # the stream is Detectron2's TrainingSampler stream
    from detectron2.data.samplers import TrainingSampler

    plain = TrainingSampler(size, seed=5)
    it = iter(plain)
    assert [index for _, index in _take(ResumableTrainingSampler(size, seed=5), 30)] == [next(it) for _ in range(30)]


def _random_mapper(d):  # an "augmentation" that draws from all three global generators
    import random

    import numpy as np

    return {**d, "draw": (random.random(), float(np.random.rand()), float(torch.rand(())))}


@pytest.mark.parametrize("num_workers, grouping", [(0, True), (1, True), (2, False)])
def test_loader_resumes_batches_and_augmentations(num_workers, grouping):
    from detectron2.data import DatasetFromList, build_detection_train_loader

    from acm_d2.engine import SeededMapDataset

    dicts = [{"id": i, "width": 4 if i % 3 else 2, "height": 3} for i in range(9)]
    groups = [0 if d["width"] > d["height"] else 1 for d in dicts] if grouping else None

    def loader(start_iter):
        sampler = ResumableTrainingSampler(len(dicts), seed=3, aspect_groups=groups)
        sampler.resume(start_iter, 2)
        dataset = SeededMapDataset(DatasetFromList(dicts, copy=False), _random_mapper, seed=3)
        return build_detection_train_loader(
            dataset=dataset, mapper=None, sampler=sampler, total_batch_size=2,
            aspect_ratio_grouping=grouping, num_workers=num_workers,
        )

    def first(data_loader, n):
        return [[(d["id"], d["draw"]) for d in batch] for batch in _take(data_loader, n)]

    full = first(loader(0), 8)
    assert first(loader(5), 3) == full[5:]
    assert len({d for batch in full for _, d in batch}) == 16  # the draws differ image to image


def test_starting_the_loader_draws_nothing_from_the_global_generator():
    """Detectron2 starts the loader's iterator at the first step of each run, right after
    IterationSeed seeded the global generators: at iteration 0 in a full run, at the resume
    iteration in a resumed one. With NUM_WORKERS 1 (the built-in configs') the DataLoader
    would draw its workers' base seed from torch's global generator there; the resumable
    loader has a generator of its own."""
    from detectron2.data import DatasetCatalog, build_detection_train_loader

    from acm_d2.engine import build_resumable_train_loader
    from conftest import acm_cfg

    name = "test_resume_loader_generator"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"id": i, "width": 4, "height": 3} for i in range(6)])
    cfg = acm_cfg(
        "configs/Base-RCNN-FPN-ACM.yaml", "DATASETS.TRAIN", f"('{name}',)", "DATALOADER.NUM_WORKERS", "1",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "SOLVER.IMS_PER_BATCH", "2",
    )
    loader, sampler, dataset = build_resumable_train_loader(cfg, mapper=lambda d: d, seed=3)
    plain = build_detection_train_loader(dataset=dataset, mapper=None, sampler=sampler, total_batch_size=2, num_workers=1)
    drawn = {}
    for kind, data_loader in (("resumable", loader), ("plain", plain)):
        torch.manual_seed(5)
        before = torch.get_rng_state()
        assert len(next(iter(data_loader))) == 2
        drawn[kind] = not torch.equal(before, torch.get_rng_state())
    assert drawn == {"resumable": False, "plain": True}


def _take(iterable, n):
    out = []
    for x in iterable:
        out.append(x)
        if len(out) == n:
            return out


# ---------------------------------------------------------------------- atomic checkpoints
def _checkpointer(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, SafeCheckpointer(model, str(tmp_path))


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # writes half a file, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)
        raise KeyboardInterrupt("killed while writing")

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(checkpointer_module.torch, "save", dying_save)
    for name in ("model_0000003", "model_0000001", "model_final"):  # new names and overwriting
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(name, iteration=3)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no temp files
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"

    # a failure while tagging: the new file is whole, last_checkpoint still names the old one
    def dying_tag(self, basename):
        raise OSError("disk full")

    monkeypatch.setattr(SafeCheckpointer, "tag_last_checkpoint", dying_tag)
    with pytest.raises(OSError):
        ckpt.save("model_0000005", iteration=5)
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    torch.load(tmp_path / "model_0000005.pth", weights_only=True)

    # resume loads the intact previous checkpoint
    fresh, ckpt2 = _checkpointer(tmp_path)
    extra = ckpt2.resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved_weights[k])


# --------------------------------------------------------------- kill and resume, end to end
@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    json_file, image_root = write_tiny_coco(tmp_path / "data", num_images=7, mixed_aspect=True)
    max_iter, period = 6, 2  # checkpoints after iterations 1, 3, 5
    workers = ["DATALOADER.NUM_WORKERS", "1"]  # the built-in configs' (with aspect-ratio grouping)

    straight = tmp_path / "straight"
    run_train_net(json_file, image_root, tiny_opts(straight, max_iter=max_iter, checkpoint_period=period) + workers)

    killed = tmp_path / "killed"
    opts = tiny_opts(killed, max_iter=max_iter, checkpoint_period=period) + workers
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        train_net_command(json_file, image_root, opts),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (killed / "last_checkpoint").exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "model_final.pth").exists(), "the run finished before it was killed"
    # the kill may hit a later save: whatever it left, last_checkpoint names a whole file
    last = (killed / "last_checkpoint").read_text()
    state = torch.load(killed / last, weights_only=True)  # our checkpoints are weights-only safe
    assert {"model", "trainer", "iteration"} <= set(state)
    assert {"optimizer"} <= set(state["trainer"]["_trainer"]) and "data_stream" in state["trainer"]
    assert state["trainer"]["hooks"]["IterationSeed"] == {"seed": 7}
    assert state["iteration"] < max_iter - 1

    (killed / ".model_0000003.pth.x1y2z3.tmp").write_bytes(b"PK half a checkpoint")  # as a kill mid-save leaves
    proc = run_train_net(json_file, image_root, opts, "--resume")
    assert not [p for p in os.listdir(killed) if p.endswith(".tmp")]
    assert f"Starting training from iteration {state['iteration'] + 1}" in proc.stdout + proc.stderr

    a = load_model_weights(straight / "model_final.pth")
    b = load_model_weights(killed / "model_final.pth")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, (
        f"resumed (from {last}, iteration {state['iteration']}) weights differ from the uninterrupted "
        f"run: {different[:5]}"
    )
    # and the run did train: the final weights differ from the first checkpoint's
    first = load_model_weights(straight / "model_0000001.pth")
    assert any(not torch.equal(first[k], a[k]) for k in a)


# ------------------------------------------- the built-in config's data loading, in process
SYNTHETIC_CONFIG = REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm.yaml"


def _synthetic_cfg(output_dir):
    """The built-in synthetic config with its data loading (NUM_WORKERS 1, aspect-ratio
    grouping), batch and solver settings, on the tiny synthetic dataset at its 64 px: two
    iterations, a checkpoint after each."""
    from detectron2.config import get_cfg

    from acm_d2 import add_acm_config
    from acm_d2.data import ensure_synthetic_dataset

    ensure_synthetic_dataset("acm_synthetic_tiny_train")
    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.merge_from_file(str(SYNTHETIC_CONFIG))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "11",
        "OUTPUT_DIR", str(output_dir),
    ])
    assert cfg.DATALOADER.NUM_WORKERS == 1 and cfg.DATALOADER.ASPECT_RATIO_GROUPING
    return cfg


def _train(output_dir, resume=False):
    from acm_d2.engine import ResumableTrainer

    trainer = ResumableTrainer(_synthetic_cfg(output_dir))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def _killed_after(source, name, output_dir):
    """OUTPUT_DIR as a run killed right after writing ``source/name`` leaves it."""
    output_dir.mkdir()
    (output_dir / name).write_bytes((source / name).read_bytes())
    (output_dir / "last_checkpoint").write_text(name)


@pytest.mark.slow
def test_builtin_config_resumes_exactly_and_always_writes_model_final(tmp_path):
    """NUM_WORKERS 1, as the built-in configs: Detectron2 creates the loader's iterator at
    the first step of each run; that must not shift the seeded global generators."""
    straight = tmp_path / "straight"
    _train(straight)
    a = load_model_weights(straight / "model_final.pth")
    first = load_model_weights(straight / "model_0000000.pth")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # iteration 1 changed the weights

    resumed = tmp_path / "resumed"
    _killed_after(straight, "model_0000000.pth", resumed)
    assert _train(resumed, resume=True).start_iter == 1
    b = load_model_weights(resumed / "model_final.pth")
    different = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not different, f"resumed weights differ from the uninterrupted run's: {list(different.items())[:5]}"

    # Killed while writing model_final.pth, MAX_ITER a multiple of CHECKPOINT_PERIOD:
    # last_checkpoint names the checkpoint of the last iteration. The resume writes model_final.
    finishing = tmp_path / "finishing"
    _killed_after(straight, "model_0000001.pth", finishing)
    assert _train(finishing, resume=True).start_iter == 2
    assert (finishing / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(finishing / "model_final.pth", weights_only=True)
    assert final["iteration"] == 1 and all(torch.equal(a[k], final["model"][k]) for k in a)


def test_resumable_trainer_used_directly_refuses_a_checkpoint_that_cannot_resume_it(tmp_path):
    """Issue 2628: the checks of prepare_output_dir also in ResumableTrainer.resume_or_load."""
    from acm_d2.checkpoint import CheckpointLoadError
    from acm_d2.engine import ResumableTrainer

    trainer = ResumableTrainer(_synthetic_cfg(tmp_path))
    model = trainer.model.state_dict()
    torch.save({"model": model}, tmp_path / "model_0000000.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000000.pth")
    with pytest.raises(CheckpointLoadError, match="holds model weights but no training state"):
        trainer.resume_or_load(resume=True)
    weight = "roi_heads.box_predictor.cls_score.weight"
    model[weight] = torch.zeros(9, model[weight].shape[1])  # (the model has 4 classes: 5 rows)
    torch.save({"model": model, "trainer": trainer.state_dict()}, tmp_path / "model_0000000.pth")
    with pytest.raises(CheckpointLoadError, match=f"{weight}: checkpoint \\(9, 256\\) vs model \\(5, 256\\)"):
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
