"""tools/train_net.py end to end: a tiny Mask R-CNN + ACM trains on a tiny COCO-format dataset
registered with --register-coco, writes a checkpoint, and --eval-only reports bbox and segm AP.

(The data and run helpers are in train_net_runs.py.)
"""
import logging
import os
import subprocess

import numpy as np
import pytest
import torch

from train_net_runs import CONFIG, REPO, load_model_weights, read_metrics, run_train_net, tiny_opts, train_net_command, write_tiny_coco


@pytest.mark.slow
def test_train_then_eval_only(tmp_path):
    json_file, image_root = write_tiny_coco(tmp_path / "data")
    out = tmp_path / "out"
    # Iteration 0 writes model_0000000.pth (CHECKPOINT_PERIOD 1 would write every one; 3 only
    # the final): compare the weights after the first iteration with the final ones.
    run_train_net(json_file, image_root, tiny_opts(out, max_iter=3, checkpoint_period=1))
    final = out / "model_final.pth"
    assert final.is_file() and (out / "last_checkpoint").read_text() == "model_final.pth"
    first, last = load_model_weights(out / "model_0000000.pth"), load_model_weights(final)
    # training changed the weights, also those of the ACM modules
    changed = [k for k in last if not torch.equal(first[k], last[k])]
    assert any(".context." in k for k in changed) and any("roi_heads" in k for k in changed)
    metrics = read_metrics(out)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(np.isfinite(losses))
    assert any("loss_acm_orth" in m for m in metrics)

    # --eval-only on the written checkpoint
    eval_out = tmp_path / "eval"
    opts = tiny_opts(eval_out) + ["MODEL.WEIGHTS", str(final)]
    proc = run_train_net(json_file, image_root, opts, "--eval-only")
    eval_out = eval_out / "eval" / "model_final"  # a folder of its own (issue 2628)
    log = (eval_out / "log.txt").read_text()
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    # Detectron2's verify_results/print_csv_format lines: "copypaste: Task: bbox", the metric
    # names, then their values
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    tasks = {}
    for i, line in enumerate(lines):
        if line.startswith("Task: "):
            names, values = lines[i + 1].split(","), [float(v) for v in lines[i + 2].split(",")]
            tasks[line[len("Task: "):]] = dict(zip(names, values))
    assert {"bbox", "segm"} <= set(tasks)
    for task in ("bbox", "segm"):
        assert 0.0 <= tasks[task]["AP"] <= 100.0  # not NaN: the model made predictions
    assert (eval_out / "inference" / "coco_instances_results.json").is_file()
    assert "acm_d2" in log and "ACM on the residual branch of 8 blocks" in log  # acm-d2's own log lines reach the log
    assert "acm_d2.data.coco_format INFO: Registering COCO-format dataset 'tiny'" in log

    # --eval-only without weights is refused rather than evaluating a random model
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(train_net_command(json_file, image_root, tiny_opts(tmp_path / "none"), "--eval-only"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--eval-only needs trained weights: set MODEL.WEIGHTS" in proc.stderr

    # nor with weights that leave parameters random (the backbone's alone, as ImageNet weights)
    backbone_only = tmp_path / "backbone_only.pth"
    torch.save({"model": {k: v for k, v in last.items() if k.startswith("backbone.bottom_up.")}}, backbone_only)
    opts = tiny_opts(tmp_path / "partial") + ["MODEL.WEIGHTS", str(backbone_only)]
    proc = subprocess.run(train_net_command(json_file, image_root, opts, "--eval-only"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "are not in the checkpoint (e.g. ['backbone.fpn_lateral2.weight'" in proc.stderr
    assert "they would keep their random initialisation" in proc.stderr


def test_full_model_gradient_clipping():
    from detectron2.config import get_cfg

    from acm_d2.engine import ResumableTrainer

    cfg = get_cfg()
    cfg.merge_from_list([
        "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "2.0",
    ])
    model = torch.nn.Linear(3, 4)
    optimizer = ResumableTrainer.build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert float(update.norm()) == pytest.approx(2.0, rel=1e-5)  # lr 1: the update is the clipped gradient
    assert "state" in optimizer.state_dict()

    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "whole"
    with pytest.raises(ValueError, match="full_model"):
        ResumableTrainer.build_optimizer(cfg, model)


def test_lazy_config_is_named_with_the_command_that_trains_it(tmp_path, monkeypatch):
    """Issue 26: a LazyConfig given to tools/train_net.py stopped at a YAML ParserError."""
    import acm_d2.train_net

    lazy = REPO / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x_acm_lazy.py"
    user = tmp_path / "user.yaml"
    user.write_text(f'_BASE_: "{lazy}"\n')
    for config_file, named in ((str(lazy), lazy), ("acm_d2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py", lazy),
                               (str(user), lazy)):
        monkeypatch.setattr("sys.argv", ["train_net.py", "--config-file", config_file, "MODEL.DEVICE", "cpu"])
        with pytest.raises(ValueError) as info:
            acm_d2.train_net.invoke_main()
        assert str(info.value).startswith(f"{named} is a LazyConfig (a Python config), not a YAML config")
        assert (f"python -m acm_d2.detectron2_tools /path/to/detectron2/tools/lazyconfig_train_net.py --config-file "
                f"{named} [key=value ...]") in str(info.value)


@pytest.fixture
def restore_loggers():
    """Undo what Detectron2's setup_logger (called by train_net.main) does to the global loggers."""
    names = ("detectron2", "d2", "fvcore", "acm_d2")
    saved = {n: (lambda lg: (lg.level, lg.propagate, list(lg.handlers)))(logging.getLogger(n)) for n in names}
    yield
    for name, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


def test_eval_only_into_a_finished_run_writes_into_its_own_folder(tmp_path, restore_loggers):
    """Issue 2628, 4: --eval-only with OUTPUT_DIR a finished run rewrote its config.yaml and inference/."""
    from acm_d2.train_net import argument_parser, main

    json_file, image_root = write_tiny_coco(tmp_path / "data", num_images=2)
    out = tmp_path / "out"
    register = ["--register-coco", "tiny2628", json_file, image_root, "--config-file", str(CONFIG)]
    opts = tiny_opts(out, max_iter=1, dataset="tiny2628")
    main(argument_parser().parse_args(register + opts))
    results = out / "inference" / "coco_instances_results.json"
    before = {p: p.read_bytes() for p in (out / "config.yaml", results)}
    torch.save(torch.load(out / "model_final.pth", weights_only=True), tmp_path / "other.pth")

    main(argument_parser().parse_args(register + ["--eval-only"] + opts + ["MODEL.WEIGHTS", str(tmp_path / "other.pth")]))
    assert {p: p.read_bytes() for p in before} == before  # the run's config.yaml and detections
    own = out / "eval" / "other"
    assert f"--eval-only: evaluating {tmp_path / 'other.pth'}; writing into {own}" in (own / "log.txt").read_text()
    assert (own / "inference" / "coco_instances_results.json").is_file()
    assert f"WEIGHTS: {tmp_path / 'other.pth'}" in (own / "config.yaml").read_text()

    main(argument_parser().parse_args(register + ["--eval-only", "--resume"] + opts))  # the run's last checkpoint
    assert f"WEIGHTS: {out / 'model_final.pth'}" in (out / "eval" / "model_final" / "config.yaml").read_text()
    assert {p: p.read_bytes() for p in before} == before
