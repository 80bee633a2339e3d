#!/usr/bin/env python
"""Draw the K and Q attention maps of a model's ACM modules over images (paper Fig. 4).

    python tools/visualize_attention.py --config-file CONFIG [--input a.png b.png ...] \
        --output DIR [--block res5.2] [--mask mask.png ... | --box X0 Y0 X1 Y1] \
        [MODEL.WEIGHTS model.pth KEY VALUE ...]

CONFIG is a YAML config (overrides: KEY VALUE, e.g. MODEL.WEIGHTS) or a LazyConfig .py
(overrides: key=value, weights from train.init_checkpoint=...). Without ``--input`` the first
``--num-images`` images of the config's first test dataset are used.

Writes to DIR, for each image and the chosen module (default: the last ACM of the model):
``<image>_<block>_attention.png`` (per group, the K and Q maps upsampled over the image,
rows of ``--groups-per-row`` groups, each tile at most ``--tile-size`` px) and
``<image>_<block>_maps.npy`` (the raw (G, 2, h, w) softmax maps). ``summary.json`` and the
printed table give, for every ACM module, the mean |cosine(K, Q)| over the images (K and Q
mean-subtracted: the paper's "similarity") and, with ``--mask`` (one, or one per image) or
``--box`` (in image pixels), the modules ranked by the attention mass their best map puts
inside the region (``--rank-by-annotations`` uses the dataset's instance masks instead).
"""
import argparse
import json
import logging
import os
import re
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acm_d2.visualization import acm_modules, attention_grid, attention_on_image, rank_modules  # noqa: E402

logger = logging.getLogger("acm_d2.visualize_attention")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="YAML or LazyConfig (.py) config")
    parser.add_argument("--input", nargs="+", default=[], help="image files (default: the test dataset's)")
    parser.add_argument("--num-images", type=int, default=8, help="images taken from the dataset without --input")
    parser.add_argument("--output", required=True, help="directory for the PNGs, maps and summary.json")
    parser.add_argument("--block", default="", help="the module to draw, e.g. res5.2 (default: the last)")
    region = parser.add_mutually_exclusive_group()
    region.add_argument("--mask", nargs="+", default=[], help="mask image(s), nonzero inside; one or one per image")
    region.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box in image pixels")
    region.add_argument(
        "--rank-by-annotations",
        action="store_true",
        help="without --input: rank modules by overlap with the union of each image's annotated instances",
    )
    parser.add_argument("--groups-per-row", type=int, default=4, help="groups per row of the grid")
    parser.add_argument("--tile-size", type=int, default=256, help="longest side of a tile (images only shrink)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    return parser


_OVERRIDE = re.compile(r"^([A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+|[A-Za-z_][\w.]*=.*)$")


def split_overrides(args) -> None:
    """Move config overrides that ``--input`` / ``--mask`` swallowed (``--mask m.png
    MODEL.WEIGHTS w.pth``) to ``args.opts``: from the first item that is no existing file and
    looks like a YAML key (``MODEL.WEIGHTS``) or a LazyConfig override (``a.b=c``)."""
    for name in ("input", "mask"):
        values = getattr(args, name)
        for i, value in enumerate(values):
            if not os.path.exists(value) and _OVERRIDE.match(value):
                setattr(args, name, values[:i])
                args.opts = values[i:] + list(args.opts)
                break


def load_model(config_file: str, opts):
    """(model in eval mode, test augmentation, input format, test dataset names)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import transforms as T

    if config_file.endswith(".py"):
        from detectron2.config import LazyConfig, instantiate

        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
        model = instantiate(cfg.model)
        device = cfg.train.get("device", "cpu") if "train" in cfg else "cpu"
        weights = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
        augmentation, datasets = None, []
        if "dataloader" in cfg and "test" in cfg.dataloader:
            augmentation = T.AugmentationList(instantiate(cfg.dataloader.test.mapper.augmentations))
            names = cfg.dataloader.test.dataset.names
            datasets = [names] if isinstance(names, str) else list(names)
        input_format = getattr(model, "input_format", "BGR")
    else:
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        from acm_d2 import add_acm_config

        cfg = get_cfg()
        add_acm_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("MODEL.DEVICE=%s is not available: running on the CPU", cfg.MODEL.DEVICE)
            cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        device, weights = cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS
        augmentation = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        input_format, datasets = cfg.INPUT.FORMAT, list(cfg.DATASETS.TEST)
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning("No weights given (MODEL.WEIGHTS / train.init_checkpoint): the maps are those of a random init")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s is not available: running on the CPU", device)
        device = "cpu"
    model.to(device).eval()
    return model, augmentation, input_format, datasets


def dataset_images(datasets, count: int, with_masks: bool):
    """[(name, BGR image, mask or None)] from the first test dataset."""
    import acm_d2.data  # noqa: F401  (registers the built-in datasets)
    from detectron2.data import DatasetCatalog

    if not datasets:
        raise SystemExit("error: no --input and the config names no test dataset")
    if datasets[0].startswith("acm_synthetic"):
        acm_d2.data.ensure_synthetic_dataset([datasets[0]])
    items = []
    for record in DatasetCatalog.get(datasets[0])[:count]:
        image = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)
        mask = None
        if with_masks:
            mask = annotation_mask(record, image.shape[:2])
        items.append((os.path.splitext(os.path.basename(record["file_name"]))[0], image, mask))
    return items


def annotation_mask(record, size) -> np.ndarray:
    """Union of the instances of a Detectron2 dataset record: masks if any, else boxes."""
    from detectron2.structures import BoxMode, polygons_to_bitmask
    from pycocotools import mask as mask_util

    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    for ann in record.get("annotations", []):
        segm = ann.get("segmentation")
        if isinstance(segm, list) and segm:
            mask |= polygons_to_bitmask(segm, height, width)
        elif isinstance(segm, dict):
            rle = mask_util.frPyObjects(segm, height, width) if isinstance(segm.get("counts"), list) else segm
            mask |= mask_util.decode(rle).astype(bool)
        else:
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
    return mask


def read_image(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"error: cannot read image {path}")
    return image


def main(argv=None) -> dict:
    args = argument_parser().parse_args(argv)
    split_overrides(args)
    absent = [p for p in list(args.input) + list(args.mask) if not os.path.isfile(p)]
    if absent:
        raise SystemExit(f"error: no such file: {', '.join(absent)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, augmentation, input_format, datasets = load_model(args.config_file, args.opts)
    modules = acm_modules(model)
    if not modules:
        raise SystemExit("error: the model has no ACM module (MODEL.ACM.MODULE must be 'ACM')")
    block = args.block or list(modules)[-1]
    if block not in modules:
        raise SystemExit(f"error: --block {block!r} is not an ACM module; the model has {list(modules)}")

    if args.input:
        if args.rank_by_annotations:
            raise SystemExit("error: --rank-by-annotations needs the dataset images (no --input)")
        items = [(os.path.splitext(os.path.basename(p))[0], read_image(p), None) for p in args.input]
    else:
        items = dataset_images(datasets, args.num_images, args.rank_by_annotations)
    if args.mask:
        if len(args.mask) not in (1, len(items)):
            raise SystemExit(f"error: give one --mask or one per image ({len(items)}), got {len(args.mask)}")
        masks = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in args.mask]
        if any(m is None for m in masks):
            raise SystemExit(f"error: cannot read a mask of {args.mask}")
        masks = masks * len(items) if len(masks) == 1 else masks
        for (_, image, _), mask in zip(items, masks):
            if mask.shape != image.shape[:2]:
                raise SystemExit(f"error: mask of shape {mask.shape} for an image of shape {image.shape[:2]}")
        items = [(name, image, mask) for (name, image, _), mask in zip(items, masks)]
    elif args.box:
        x0, y0, x1, y1 = args.box
        boxed = []
        for name, image, _ in items:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
            mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = 1
            boxed.append((name, image, mask))
        items = boxed

    os.makedirs(args.output, exist_ok=True)
    results = []
    written = []
    for name, image, mask in items:
        attention = attention_on_image(model, image, augmentation, input_format, mask=mask)
        results.append(attention)
        stem = os.path.join(args.output, f"{name}_{block}")
        cv2.imwrite(f"{stem}_attention.png", attention_grid(image, attention, block, args.groups_per_row, args.tile_size))
        np.save(f"{stem}_maps.npy", attention.maps[block].numpy())
        written.append(f"{stem}_attention.png")

    similarity = {
        name: float(np.mean([abs(r.cosine[name]) for r in results if name in r.cosine])) for name in modules
    }
    summary = {
        "config_file": args.config_file,
        "images": [name for name, _, _ in items],
        "block": block,
        "groups": modules[block].groups,
        "mean_abs_cosine_kq": similarity,
        "mean_abs_cosine_kq_all_modules": float(np.mean(list(similarity.values()))),
        "pictures": written,
    }
    if results and results[0].overlap:
        summary["ranking_by_overlap"] = rank_modules(results)
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"{len(items)} images, {len(modules)} ACM modules; pictures of {block} in {args.output}")
    print(f"{'module':<10} {'mean |cos(K,Q)|':>16}" + (f" {'overlap':>8}  best map" if "ranking_by_overlap" in summary else ""))
    rows = summary.get("ranking_by_overlap") or [{"block": n} for n in modules]
    for row in rows:
        line = f"{row['block']:<10} {similarity[row['block']]:>16.4f}"
        if "overlap" in row:
            line += f" {row['overlap']:>8.4f}  g{row['best_group']} {row['best_map']}"
        print(line)
    print(f"mean over modules: {summary['mean_abs_cosine_kq_all_modules']:.4f} (paper: 0.1113 with lambda 0, 0.0394 with 0.1)")
    return summary


if __name__ == "__main__":
    main()
