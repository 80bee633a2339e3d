"""tools/train_net.py end to end: a tiny Mask R-CNN + ACM trains on a tiny COCO-format dataset
registered with --register-coco, writes a checkpoint, and --eval-only reports bbox and segm AP.

The helpers here (``write_tiny_coco``, ``tiny_opts``, ``run_train_net``) are shared by
test_resume.py and test_distributed.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"
CONFIG = REPO / "configs" / "Base-RCNN-FPN-ACM.yaml"  # + tiny_opts: Mask R-CNN R-18 + ACM, from scratch


def write_tiny_coco(root, num_images: int = 6, size: int = 64, seed: int = 0, mixed_aspect: bool = False):
    """Write ``num_images`` PNGs of ``size`` px with 1-2 rectangles (2 categories) and a COCO
    instances JSON with polygons; return (json_file, image_root). ``mixed_aspect``: every
    third image is ``size`` wide and 3/4 of it high (another aspect-ratio group)."""
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    for i in range(num_images):
        height = size * 3 // 4 if mixed_aspect and i % 3 == 0 else size
        pixels = np.full((height, size, 3), 40, dtype=np.uint8)
        pixels += rng.randint(0, 20, size=pixels.shape).astype(np.uint8)
        for _ in range(1 + i % 2):
            category = int(rng.randint(1, 3))
            w, h = rng.randint(14, 30, size=2)
            x, y = rng.randint(0, size - w), rng.randint(0, height - h)
            pixels[y : y + h, x : x + w] = (200, 60, 60) if category == 1 else (60, 200, 60)
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category,
                    "bbox": [int(x), int(y), int(w), int(h)],
                    "area": int(w * h),
                    "iscrowd": 0,
                    "segmentation": [[float(v) for v in polygon]],
                }
            )
        name = f"img_{i}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": height})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(json_file), str(images_dir)


def tiny_opts(output_dir, max_iter: int = 4, checkpoint_period: int = 100, dataset: str = "tiny"):
    """Config options (after --config-file CONFIG) for a tiny, fast Mask R-CNN R-18 + ACM."""
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.MASK_ON", "True",
        "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ACM.GROUPS", "8",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still predicts: real AP
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "2",
        "INPUT.MASK_FORMAT", "polygon",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "DATASETS.TRAIN", f"('{dataset}',)",
        "DATASETS.TEST", f"('{dataset}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period),
        "TEST.EVAL_PERIOD", "0",
        "SEED", "7",
        "OUTPUT_DIR", str(output_dir),
    ]


def train_net_command(json_file, image_root, opts, *flags, dataset: str = "tiny"):
    return [
        sys.executable, str(TRAIN_NET),
        "--config-file", str(CONFIG),
        "--register-coco", dataset, str(json_file), str(image_root),
        *flags,
        *opts,
    ]


def run_train_net(json_file, image_root, opts, *flags, timeout: float = 300):
    """Run tools/train_net.py to completion; return its CompletedProcess (asserting success)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        train_net_command(json_file, image_root, opts, *flags),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"train_net failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(output_dir):
    path = Path(output_dir) / "metrics.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_model_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


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
    assert any(".acm." in k for k in changed) and any("roi_heads" in k for k in changed)
    metrics = read_metrics(out)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(np.isfinite(losses))
    assert any("loss_acm_orth" in m for m in metrics)

    # --eval-only on the written checkpoint
    eval_out = tmp_path / "eval"
    opts = tiny_opts(eval_out) + ["MODEL.WEIGHTS", str(final)]
    proc = run_train_net(json_file, image_root, opts, "--eval-only")
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
    assert "acm_d2" in log and "ACM in every block of" in log  # acm-d2's own log lines reach the log

    # --eval-only without weights is refused rather than evaluating a random model
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(train_net_command(json_file, image_root, tiny_opts(tmp_path / "none"), "--eval-only"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--eval-only needs trained weights: set MODEL.WEIGHTS" in proc.stderr


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
