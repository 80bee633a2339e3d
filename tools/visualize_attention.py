#!/usr/bin/env python
"""Draw the K and Q attention maps of a model's ACM modules over images (paper Fig. 4), or, for
a model with NL, CC, GC or CBAM, where its modules look from one position.

    python tools/visualize_attention.py --config-file CONFIG [--input a.png b.png ...] \
        --output DIR [--block res5.2] [--mask mask.png ... | --box X0 Y0 X1 Y1 | --rank-by-annotations] \
        [MODEL.WEIGHTS model.pth KEY VALUE ...]

CONFIG is a YAML config (overrides KEY VALUE) or a LazyConfig .py (overrides key=value, weights
from train.init_checkpoint=...). Without ``--input`` the first ``--num-images`` images of the
config's first test dataset are used. Writes to DIR, for each image and the chosen module
(default: the last ACM): ``<image>_<block>_attention.png`` (per group the K and Q maps over the
image) and ``<image>_<block>_maps.npy`` (the raw (G, 2, h, w) maps); ``summary.json`` and the
printed table give each module's mean |cosine(K, Q)| and, with a region, the modules ranked by
the attention mass inside it (acm_d2/visualization.py computes all of it).

For a model with peers (MODEL.ACM.MODULE NL, CC, GC, CBAM), ``--position X Y`` (image pixels;
default: the centre) chooses the position whose map is drawn: ``<image>_<block>_attention.png``
(the map over the image, the position marked) and ``<image>_<block>_map.npy``.
"""
import argparse
import json
import logging
import os

import cv2
import numpy as np

from acm_d2 import acm_modules
from acm_d2.config import load_model_for_inference
from acm_d2.modeling import context_modules
from acm_d2.visualization import (
    attention_grid,
    attention_on_image,
    dataset_images,
    position_attention_on_image,
    position_attention_picture,
    summarize_attention,
)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="YAML or LazyConfig (.py) config")
    parser.add_argument("--input", nargs="+", default=[], help="image files (default: the test dataset's)")
    parser.add_argument("--num-images", type=int, default=8, help="images taken from the dataset without --input")
    parser.add_argument("--output", required=True, help="directory for the PNGs, maps and summary.json")
    parser.add_argument("--block", default="", help="the module to draw, e.g. res5.2 (default: the last)")
    region = parser.add_mutually_exclusive_group()
    region.add_argument("--mask", nargs="+", default=[], help="mask image(s), nonzero inside; one, or one per image")
    region.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box in image pixels")
    region.add_argument("--rank-by-annotations", action="store_true",
                        help="without --input: rank modules by overlap with each image's annotated instances")
    parser.add_argument("--position", nargs=2, type=float, metavar=("X", "Y"),
                        help="NL / CC / GC / CBAM models: the image position whose map is drawn (default: centre)")
    parser.add_argument("--groups-per-row", type=int, default=4, help="groups per row of the grid")
    parser.add_argument("--tile-size", type=int, default=256, help="longest side of a tile (images only shrink)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides (after --opts)")
    return parser


def read(path: str, flags=cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imread(path, flags)
    if image is None:
        raise SystemExit(f"error: cannot read image {path}")
    return image


def main(argv=None) -> dict:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.input and args.rank_by_annotations:
        raise SystemExit("error: --rank-by-annotations needs the dataset images (no --input)")
    loaded = load_model_for_inference(args.config_file, args.opts)
    modules = acm_modules(loaded.model)
    if not modules:
        return draw_positions(args, loaded)
    block = args.block or list(modules)[-1]
    if block not in modules:
        raise SystemExit(f"error: --block {block!r} is not an ACM module; the model has {list(modules)}")
    if args.input:
        items = [(os.path.splitext(os.path.basename(p))[0], read(p), None) for p in args.input]
    else:
        items = dataset_images(loaded.test_datasets, args.num_images, with_masks=args.rank_by_annotations)
    if args.mask:
        if len(args.mask) not in (1, len(items)):
            raise SystemExit(f"error: give one --mask or one per image ({len(items)}), got {len(args.mask)}")
        masks = [read(p, cv2.IMREAD_GRAYSCALE) for p in args.mask] * (len(items) if len(args.mask) == 1 else 1)
        items = [(name, image, mask) for (name, image, _), mask in zip(items, masks)]
    elif args.box:
        x0, y0, x1, y1 = args.box
        boxed = []
        for name, image, _ in items:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
            mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = 1
            boxed.append((name, image, mask))
        items = boxed
    for name, image, mask in items:
        if mask is not None and mask.shape != image.shape[:2]:
            raise SystemExit(f"error: a mask of shape {mask.shape} for image {name} of shape {image.shape[:2]}")

    os.makedirs(args.output, exist_ok=True)
    results, pictures = [], []
    for name, image, mask in items:
        attention = attention_on_image(loaded.model, image, loaded.augmentation, loaded.input_format, mask=mask)
        results.append(attention)
        stem = os.path.join(args.output, f"{name}_{block}")
        cv2.imwrite(f"{stem}_attention.png", attention_grid(image, attention, block, args.groups_per_row, args.tile_size))
        np.save(f"{stem}_maps.npy", attention.maps[block].numpy())
        pictures.append(f"{stem}_attention.png")
    summary, table = summarize_attention(results, block, modules[block].groups)
    summary.update(config_file=args.config_file, images=[name for name, _, _ in items], pictures=pictures)
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{len(items)} images, {len(modules)} ACM modules; pictures of {block} in {args.output}")
    print("\n".join(table))
    return summary


def draw_positions(args, loaded) -> dict:
    """The maps of a model whose context modules are peers (NL, CC, GC, CBAM) for one position."""
    modules = [n for n, m in context_modules(loaded.model).items() if hasattr(m, "attention_of_position")]
    if not modules:
        raise SystemExit("error: the model has no module with attention maps (MODEL.ACM.MODULE ACM, NL, CC, GC or CBAM)")
    block = args.block or modules[-1]
    if block not in modules:
        raise SystemExit(f"error: --block {block!r} is not a module with maps; the model has {modules}")
    items = ([(os.path.splitext(os.path.basename(p))[0], read(p), None) for p in args.input] if args.input
             else dataset_images(loaded.test_datasets, args.num_images))
    os.makedirs(args.output, exist_ok=True)
    summary = {"config_file": args.config_file, "block": block, "modules": modules, "images": {}}
    for name, image, _ in items:
        position = args.position or (image.shape[1] / 2, image.shape[0] / 2)
        attention = position_attention_on_image(loaded.model, image, position, loaded.augmentation, loaded.input_format)
        stem = os.path.join(args.output, f"{name}_{block}")
        cv2.imwrite(f"{stem}_attention.png", position_attention_picture(image, attention, block))
        np.save(f"{stem}_map.npy", attention.maps[block].numpy())
        summary["images"][name] = {"position": list(position), "feature_position": list(attention.feature_positions[block]),
                                   "picture": f"{stem}_attention.png"}
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{len(items)} images; the map of {block} for the chosen position in {args.output}")
    return summary


if __name__ == "__main__":
    main()
