"""Pictures of a trained model on a dataset: predictions next to the ground truth, and the
K and Q attention maps of one ACM module (drawn by :mod:`acm_d2.visualization`)."""
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from ..modeling.resnet import acm_modules
from ..visualization import attention_grid, attention_on_image

__all__ = ["draw_attention", "draw_predictions"]


def draw_predictions(cfg, model, dataset_name: str, out_path, num_images: int = 6, score_threshold: float = 0.5) -> Path:
    """Ground truth (top / left) and predictions (bottom / right) of the first images of
    ``dataset_name``, drawn by Detectron2's Visualizer, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2.utils.visualizer import Visualizer

    meta = MetadataCatalog.get(dataset_name)
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    scale = max(1.0, 256 / max(cfg.INPUT.MIN_SIZE_TEST, 1))
    aspect = dicts[0]["width"] / dicts[0]["height"]
    if aspect > 1.5:  # wide images: one row per image (ground truth | prediction)
        fig, axes = plt.subplots(len(dicts), 2, figsize=(2 * 2.4 * aspect, 2.6 * len(dicts)), squeeze=False)
        axes = axes.T
    else:
        fig, axes = plt.subplots(2, len(dicts), figsize=(2.6 * len(dicts), 5.6), squeeze=False)
    for col, record in enumerate(dicts):
        bgr = cv2.imread(record["file_name"])
        height, width = bgr.shape[:2]
        image = resize.get_transform(bgr).apply_image(bgr)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            instances = model([{"image": tensor, "height": height, "width": width}])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        rgb = bgr[:, :, ::-1]
        truth = Visualizer(rgb, meta, scale=scale).draw_dataset_dict(record).get_image()
        predicted = Visualizer(rgb, meta, scale=scale).draw_instance_predictions(instances).get_image()
        for row, (picture, title) in enumerate(((truth, "ground truth"), (predicted, f"prediction (score >= {score_threshold})"))):
            axes[row, col].imshow(picture)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def draw_attention(cfg, model, dataset_name: str, out_path, block: Optional[str] = None, num_images: int = 2,
                   groups_per_row: int = 4) -> Optional[Path]:
    """The K and Q maps of every group of one ACM module over the first images of
    ``dataset_name`` (one :func:`acm_d2.visualization.attention_grid` per image, stacked), as
    one PNG. ``block`` defaults to the last module of res4. None if the model has no ACM."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T

    modules = acm_modules(model)
    if not modules:
        return None
    if block is None:
        res4 = [name for name in modules if name.startswith("res4")]
        block = res4[-1] if res4 else list(modules)[-1]
    if block not in modules:
        raise ValueError(f"ACM block {block!r}: the model's ACM blocks are {list(modules)}")
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    grids = []
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = cv2.imread(record["file_name"])
        attention = attention_on_image(model, image, resize, cfg.INPUT.FORMAT)
        grids.append(attention_grid(image, attention, block, groups_per_row=groups_per_row))
    width = max(g.shape[1] for g in grids)
    canvas = np.concatenate([np.pad(g, ((0, 4), (0, width - g.shape[1]), (0, 0))) for g in grids], axis=0)
    out_path = Path(out_path)
    cv2.imwrite(str(out_path), canvas)
    return out_path
