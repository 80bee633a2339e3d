"""A run owns its OUTPUT_DIR (lock, no silent overwrite), and --resume compares the configs
and checks the checkpoint's fields before anything runs or is written (issue 18)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.solver.lr_scheduler import LRMultiplier
from fvcore.common.param_scheduler import MultiStepParamScheduler

from acm_d2.checkpoint import CheckpointLoadError
from acm_d2.engine import OutputDirInUseError, OutputDirNotEmptyError, ResumeConfigError, check_resume_checkpoint, prepare_output_dir
from acm_d2.engine.resume_check import apply_solver_settings, validate_trainer_state
from acm_d2.engine.run_dir import LOCK_NAME, OutputDirLock
from conftest import acm_cfg
from train_net_runs import REPO, load_model_weights, read_metrics, run_train_net, tiny_opts, train_net_command, write_tiny_coco


def _cfg(output_dir, **solver):
    cfg = acm_cfg()
    cfg.OUTPUT_DIR = str(output_dir)
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def test_a_second_run_is_refused_naming_the_first_and_a_killed_run_leaves_a_stale_lock(tmp_path, caplog):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from acm_d2.engine.run_dir import lock_output_dir; "
         "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError) as info:
            OutputDirLock(str(out)).acquire()
        assert f"OUTPUT_DIR {out} is in use by another run: process {holder.pid} on host" in str(info.value)
        assert "Wait for it to end, or set another OUTPUT_DIR" in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()  # the killed run's lock file stays, but its lock is free
    lock = OutputDirLock(str(out))
    lock.acquire()
    assert f"has a stale lock of process {holder.pid}" in caplog.text
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()  # released: removed


def test_an_earlier_run_is_not_overwritten_without_the_flag(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model_0000009.pth", "model_final.pth", "metrics.json", "log.txt"):
        (out / name).write_text(name)
    (out / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(OutputDirNotEmptyError) as info:
        prepare_output_dir(_cfg(out), resume=False)
    message = str(info.value)
    assert f"OUTPUT_DIR {out} holds the checkpoints of an earlier run (last_checkpoint, model_0000009.pth, model_final.pth)" in message
    assert "Pass --resume to continue that run, --overwrite to start afresh" in message
    cfg = _cfg(out)
    cfg.MODEL.WEIGHTS = str(out / "model_0000009.pth")
    with pytest.raises(ValueError, match="--eval-only needs trained weights"):
        prepare_output_dir(_cfg(out), resume=False, eval_only=True)
    # evaluating writes into a folder of its own, OUTPUT_DIR/eval/<weights stem>/ (issue 2628)
    assert prepare_output_dir(cfg, resume=False, eval_only=True).OUTPUT_DIR == str(out / "eval" / "model_0000009")
    resumed = prepare_output_dir(_cfg(out), resume=True, eval_only=True)  # the checkpoint of last_checkpoint
    assert (resumed.OUTPUT_DIR, resumed.MODEL.WEIGHTS) == (str(out / "eval" / "model_final"), str(out / "model_final.pth"))
    prepare_output_dir(_cfg(out), resume=False, overwrite=True)
    (previous,) = (out / "previous_runs").iterdir()
    assert sorted(p.name for p in previous.iterdir()) == ["eval", "last_checkpoint", "log.txt", "metrics.json", "model_0000009.pth", "model_final.pth"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "previous_runs"]


def test_solver_settings_of_the_new_config_are_applied_to_the_resumed_optimizer():
    param = torch.nn.Parameter(torch.zeros(2))

    def build(lr, momentum, weight_decay):
        optimizer = torch.optim.SGD([param], lr=lr, momentum=momentum, weight_decay=weight_decay)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        scheduler = LRMultiplier(optimizer, MultiStepParamScheduler([1.0, 0.1], milestones=[5], num_updates=10), 10)
        return optimizer, scheduler, configured

    old_optimizer, old_scheduler, _ = build(0.02, 0.9, 1e-4)
    for _ in range(6):
        old_optimizer.step()
        old_scheduler.step()
    optimizer, scheduler, configured = build(0.5, 0.8, 1e-3)  # the new config
    optimizer.load_state_dict(old_optimizer.state_dict())  # what --resume loads: the old values
    scheduler.load_state_dict(old_scheduler.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002) and scheduler.base_lrs == [0.02]
    changed = apply_solver_settings(optimizer, scheduler, configured)
    assert changed == ["group 0 base lr 0.02 -> 0.5", "group 0 momentum 0.9 -> 0.8", "group 0 weight_decay 0.0001 -> 0.001"]
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], scheduler.base_lrs) == (0.8, 1e-3, [0.5])
    assert group["lr"] == pytest.approx(0.05)  # the new base LR x the schedule's 0.1 at iteration 6
    assert apply_solver_settings(optimizer, scheduler, configured) == []  # the same config: nothing changes
    scheduler.last_epoch = 12  # resumed past a smaller MAX_ITER (10): nothing is left to schedule
    assert apply_solver_settings(optimizer, scheduler, configured) == [] and group["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("iteration", -5, "the checkpoint's trainer iteration is -5, expected an integer >= 0"),
        ("iteration", "7", "the checkpoint's trainer iteration is '7', expected an integer >= 0"),
        ("base_lrs", [float("nan")], "the checkpoint's LR scheduler base_lrs is [nan], expected 1 finite numbers"),
        ("base_lrs", [0.1, 0.1], "the checkpoint's LR scheduler base_lrs is [0.1, 0.1], expected 1 finite numbers"),
        ("seed", "x", "the checkpoint's data stream seed is 'x', expected an integer in 0..2**63-1"),
        ("groups", 2, "the checkpoint's optimizer param_groups is '2 groups', expected 1 (this model's and config's)"),
        ("lr", float("inf"), "the checkpoint's optimizer param group 0 lr is inf, expected a finite number >= 0"),
    ],
)
def test_checkpoint_fields_are_validated_before_use(field, value, words):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state = {
        "iteration": 3,
        "hooks": {"LRScheduler": {"base_lrs": [0.1], "last_epoch": 4}, "IterationSeed": {"seed": 5}},
        "_trainer": {"optimizer": optimizer.state_dict()},
        "data_stream": {"seed": 5},
    }
    validate_trainer_state(state, "ckpt.pth", optimizer)
    if field == "iteration":
        state["iteration"] = value
    elif field == "base_lrs":
        state["hooks"]["LRScheduler"]["base_lrs"] = value
    elif field == "seed":
        state["data_stream"]["seed"] = value
    elif field == "groups":
        state["_trainer"]["optimizer"]["param_groups"] *= value
    else:
        state["_trainer"]["optimizer"]["param_groups"][0][field] = value
    with pytest.raises(CheckpointLoadError) as info:
        validate_trainer_state(state, "ckpt.pth", optimizer)
    assert str(info.value).startswith(f"ckpt.pth: {words}; the file is corrupted")


@pytest.mark.slow
def test_resume_refuses_breaking_changes_before_writing_and_applies_the_lr(tmp_path):
    json_file, image_root = write_tiny_coco(tmp_path / "data", num_images=4)
    out = tmp_path / "out"
    no_eval = ["DATASETS.TEST", "()"]  # (faster)
    run_train_net(json_file, image_root, tiny_opts(out, max_iter=2, checkpoint_period=1) + no_eval)
    config_yaml = (out / "config.yaml").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    changed = tiny_opts(out, max_iter=3) + no_eval + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ACM.VARIANT", "PX"]
    # one command line: the same command without --resume is refused by the same check (before any file)
    script = ("import sys; from acm_d2 import train_net\n"
              "for flags in (['--resume'], []):\n"
              "    try:\n"
              "        train_net.main(train_net.argument_parser().parse_args(flags + sys.argv[1:]))\n"
              "    except Exception as e:\n"
              "        print(type(e).__name__, e, file=sys.stderr)\n"
              "sys.exit(1)")
    command = train_net_command(json_file, image_root, changed)
    proc = subprocess.run([sys.executable, "-c", script] + command[2:], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "OutputDirNotEmptyError OUTPUT_DIR" in proc.stderr and "Pass --resume to continue that run, --overwrite" in proc.stderr
    assert proc.returncode != 0
    assert f"--resume from {out / 'model_final.pth'}: the config differs from the one the checkpoint was trained with in 2 setting(s)" in proc.stderr
    assert "  MODEL.ACM.VARIANT: checkpoint 'P(X+(K-Q))', now 'PX'\n  MODEL.ROI_HEADS.NUM_CLASSES: checkpoint 2, now 3" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # config.yaml, log.txt, checkpoints
    assert (out / "config.yaml").read_text() == config_yaml
    with open(out / "metrics.json", "a") as f:  # as if the interrupted run had logged iterations after its checkpoint
        f.write(json.dumps({"iteration": 5, "total_loss": 9.0}) + "\n")
    # LR and schedule changed: applied from the resumed iteration on, and said so
    lr = run_train_net(json_file, image_root, tiny_opts(out, max_iter=3) + no_eval + ["SOLVER.BASE_LR", "0.004"], "--resume")
    assert "--resume with a changed SOLVER.BASE_LR: checkpoint" in lr.stderr and "now 0.004 (applied" in lr.stderr
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["trainer"]["hooks"]["LRScheduler"]["base_lrs"][0] == 0.004
    assert final["trainer"]["iteration"] == 2
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [1, 2]  # each iteration once
    assert load_model_weights(out / "model_final.pth")


def test_resume_without_a_checkpoint_to_resume_from_does_not_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_0000009.pth").write_text("x")
    with pytest.raises(OutputDirNotEmptyError, match="--resume: OUTPUT_DIR .* has checkpoints \\(model_0000009.pth\\) but no last_checkpoint"):
        prepare_output_dir(_cfg(out), resume=True)
    crashed = tmp_path / "crashed"  # an earlier run that logged metrics but wrote no checkpoint
    crashed.mkdir()
    (crashed / "metrics.json").write_text('{"iteration": 3}\n')
    prepare_output_dir(_cfg(crashed), resume=True)
    assert not (crashed / "metrics.json").exists() and len(list((crashed / "previous_runs").iterdir())) == 1


def _tiny_cfg(output_dir, max_iter=5):
    """The tiny Mask R-CNN R-18 + ACM of train_net_runs (MAX_ITER ``max_iter``), frozen."""
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", *tiny_opts(output_dir, max_iter=max_iter)[2:])
    cfg.freeze()
    return cfg


def _model_tensors(cfg):
    """Zero tensors of the shapes of the model's state_dict (the model built on the meta device)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


def _write_run(out, cfg, model, trainer):
    """OUTPUT_DIR of an earlier run whose last_checkpoint names model_0000004.pth; returns the
    files' modification times."""
    out.mkdir()
    data = {"model": model} if trainer is None else {"model": model, "trainer": trainer}
    torch.save(data, out / "model_0000004.pth")
    (out / "last_checkpoint").write_text("model_0000004.pth")
    (out / "metrics.json").write_text('{"iteration": 4, "total_loss": 1.0}\n')
    (out / "config.yaml").write_text(cfg.dump())
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def _unchanged(out, before):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_NAME} == before


def test_resume_refuses_a_checkpoint_whose_tensors_do_not_fit_the_model(tmp_path):
    """Issue 2628, 1: Detectron2 skipped the mismatched head with a warning and trained it from random."""
    cfg = _tiny_cfg(tmp_path / "ok")
    model = _model_tensors(cfg)
    trainer = {"iteration": 4, "config": cfg.dump()}
    _write_run(tmp_path / "ok", cfg, model, trainer)
    prepare_output_dir(cfg, resume=True)  # every tensor fits: resumed

    out = tmp_path / "out"
    cfg = _tiny_cfg(out)
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 64)  # a head for 80 classes
    del model["roi_heads.mask_head.predictor.bias"]
    model["roi_heads.keypoint_head.score_lowres.weight"] = torch.zeros(17, 32, 4, 4)
    before = _write_run(out, cfg, model, trainer)
    with pytest.raises(CheckpointLoadError) as info:
        prepare_output_dir(cfg, resume=True)
    message = str(info.value)
    assert message.startswith(
        f"--resume from {out / 'model_0000004.pth'}: the checkpoint's model does not fit this model "
        "(a resumed run continues with every tensor of the checkpoint):\n"
        "  1 tensor(s) of another shape (key: checkpoint shape vs model shape):\n"
        "    roi_heads.box_predictor.cls_score.weight: checkpoint (81, 64) vs model (3, 64)\n"
        "  1 model tensor(s) missing from the checkpoint: ['roi_heads.mask_head.predictor.bias']\n"
        "  1 checkpoint tensor(s) the model does not have: ['roi_heads.keypoint_head.score_lowres.weight']\n"
    )
    assert "MODEL.WEIGHTS" in message and "Nothing was run or written." in message
    assert _unchanged(out, before)


def test_resume_refuses_a_weights_only_checkpoint(tmp_path):
    """Issue 2628, 2: a file without training state started again at iteration 1 over the run's files."""
    for name, trainer in (("no_trainer", None), ("no_iteration", {"config": "x"})):
        out = tmp_path / name
        cfg = _tiny_cfg(out)
        before = _write_run(out, cfg, {"w": torch.zeros(2)}, trainer)
        with pytest.raises(CheckpointLoadError) as info:
            prepare_output_dir(cfg, resume=True)
        assert str(info.value).startswith(
            f"--resume from {out / 'model_0000004.pth'} (named by {out / 'last_checkpoint'}): the file holds model "
            "weights but no training state (no 'trainer' entry with an integer 'iteration'), so there is no run to "
            "resume; a resume would start at iteration 1 and overwrite this run's checkpoints and metrics.json. "
            f"To fine-tune from it, set MODEL.WEIGHTS {out / 'model_0000004.pth'} in another OUTPUT_DIR"
        )
        assert _unchanged(out, before)


def test_resume_refuses_a_checkpoint_beyond_max_iter(tmp_path):
    """Issue 2628, 3: resuming iteration 4 with SOLVER.MAX_ITER 3 evaluated it as final, with no word."""
    out = tmp_path / "out"
    cfg = _tiny_cfg(out, max_iter=5)
    before = _write_run(out, cfg, _model_tensors(cfg), {"iteration": 4, "config": cfg.dump()})
    prepare_output_dir(cfg, resume=True)  # iteration 4 is the last of MAX_ITER 5: a finished run, resumed
    cfg = _tiny_cfg(out, max_iter=3)
    with pytest.raises(ResumeConfigError) as info:
        prepare_output_dir(cfg, resume=True)
    assert str(info.value).startswith(
        f"--resume from {out / 'model_0000004.pth'}: the checkpoint is of iteration 4, beyond SOLVER.MAX_ITER 3 "
        "(the last iteration of a run is MAX_ITER - 1 = 2): there is nothing left to train, and its weights are "
        "not those of a run of 3 iterations. Set SOLVER.MAX_ITER to at least 5 to continue it"
    )
    assert _unchanged(out, before)
    # MAX_ITER as the trainer runs it: 3 for 2 processes is 6 for this one (SOLVER.REFERENCE_WORLD_SIZE)
    cfg = _tiny_cfg(out, max_iter=3)
    cfg.defrost()
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 2
    assert check_resume_checkpoint(cfg, str(out / "model_0000004.pth")) == 4
    cfg.SOLVER.MAX_ITER = 2
    with pytest.raises(ResumeConfigError, match="beyond SOLVER.MAX_ITER 4, scaled from 2 for 1 processes by SOLVER.REFERENCE_WORLD_SIZE"):
        check_resume_checkpoint(cfg, str(out / "model_0000004.pth"))
