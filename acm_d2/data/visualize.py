"""Pictures of the synthetic dataset (used for docs/images/synthetic_samples.png)."""
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["draw_synthetic_samples"]

logger = logging.getLogger(__name__)


def draw_synthetic_samples(
    out_path, dataset_name: str = "acm_synthetic_train", num: int = 8, columns: int = 4,
    scale: float = 2.0, cache_root: Optional[Path] = None,
) -> Path:
    """Draw ``num`` images of a built-in synthetic dataset with their annotations.

    Each tile shows the image on the left and, on the right, the ground truth drawn by
    Detectron2's Visualizer (masks, boxes, category names; the unannotated tube is marked
    with a dashed outline). Writes a PNG to ``out_path`` and returns its path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.visualizer import Visualizer

    from .builtin import ensure_synthetic_dataset

    paths = ensure_synthetic_dataset(dataset_name, cache_root)
    split = "train" if dataset_name.endswith("_train") else "val"
    with open(paths[f"{split}_json"]) as f:
        tubes = json.load(f)["tubes"]
    dicts = DatasetCatalog.get(dataset_name)[:num]
    meta = MetadataCatalog.get(dataset_name)
    rows = int(np.ceil(len(dicts) / columns))
    aspect = dicts[0]["width"] / dicts[0]["height"]
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * 2 * scale * aspect, rows * scale + 0.4), squeeze=False
    )
    import cv2

    for ax in axes.flat:
        ax.axis("off")
    for ax, d in zip(axes.flat, dicts):
        image = cv2.imread(d["file_name"])[:, :, ::-1]
        zoom = max(1, int(round(288 / max(image.shape[:2]))))  # draw labels on a bigger canvas
        big = cv2.resize(image, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
        vis = Visualizer(image, meta, scale=zoom).draw_dataset_dict(d).get_image()
        vis = cv2.resize(vis, (big.shape[1], big.shape[0]), interpolation=cv2.INTER_NEAREST)
        tile = np.concatenate([big, np.full((big.shape[0], 4 * zoom, 3), 255, np.uint8), vis], axis=1)
        ax.imshow(tile, interpolation="nearest")
        tube = tubes[str(d["image_id"])]
        offset = big.shape[1] + 4 * zoom
        if tube is not None:
            xs = [tube[0] * zoom + offset, tube[2] * zoom + offset]
            ax.plot(xs, [tube[1] * zoom, tube[3] * zoom], "--", color="black", lw=1)
        ax.set_title("tube present: lesions treated" if tube else "no tube: lesions emergency", fontsize=8)
    fig.suptitle(f"{dataset_name}: image | ground truth", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    logger.info("Wrote %s", out_path)
    return out_path
