"""Tiny COCO-format data and tools/train_net.py runs, shared by the end-to-end tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
