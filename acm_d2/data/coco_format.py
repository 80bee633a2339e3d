"""Checked registration of users' own COCO-format instance datasets.

:func:`register_coco_format_dataset` validates the files before anything trains, so a wrong
path or a broken JSON fails at once with a message that names the file and the problem,
instead of deep inside the data loader or, worse, in the evaluator after hours of training.
"""
import json
import logging
import os
from pathlib import Path
from typing import Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["CocoFormatError", "register_coco_format_dataset", "validate_coco_instances"]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW = 5  # how many offending ids to quote in a message


class CocoFormatError(ValueError):
    """A COCO-format dataset that cannot be registered; the message says why."""


def _quote(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _SHOW else "")


def validate_coco_instances(json_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike]) -> dict:
    """Check ``json_file`` and ``image_root`` of a COCO instances dataset; return the JSON.

    Raises:
        FileNotFoundError: the JSON file or the image folder does not exist.
        CocoFormatError: the file is not JSON, not COCO instances format (a key among
            ``images``, ``annotations``, ``categories`` is missing or not a list), or its
            annotations refer to image or category ids that do not exist, or images lack
            ``id``/``file_name``, or image files are missing under ``image_root``.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {json_file} does not exist (or is not a file)")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} (for {json_file}) does not exist (or is not a folder)")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except ValueError as e:
        raise CocoFormatError(f"{json_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{json_file} is not COCO instances format: the top level is a {type(data).__name__}, "
            f"expected an object with keys {list(_REQUIRED_KEYS)}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise CocoFormatError(
            f"{json_file} is not COCO instances format: missing key(s) {missing} "
            f"(a COCO instances file has {list(_REQUIRED_KEYS)})"
        )
    for key in _REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise CocoFormatError(
                f"{json_file} is not COCO instances format: '{key}' is a {type(data[key]).__name__}, expected a list"
            )

    bad_images = [i for i, img in enumerate(data["images"]) if not isinstance(img, dict) or "id" not in img or "file_name" not in img]
    if bad_images:
        raise CocoFormatError(f"{json_file}: images at positions {_quote(bad_images)} lack 'id' or 'file_name'")
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {c.get("id") for c in data["categories"] if isinstance(c, dict)}

    orphan = sorted({a.get("image_id") for a in data["annotations"] if a.get("image_id") not in image_ids}, key=str)
    if orphan:
        raise CocoFormatError(
            f"{json_file}: annotations refer to image ids that are not in 'images': {_quote(orphan)}"
        )
    unknown = sorted({a.get("category_id") for a in data["annotations"] if a.get("category_id") not in category_ids}, key=str)
    if unknown:
        raise CocoFormatError(
            f"{json_file}: annotations refer to category ids that are not in 'categories': {_quote(unknown)}"
        )
    absent = [img["file_name"] for img in data["images"] if not (image_root / img["file_name"]).is_file()]
    if absent:
        raise CocoFormatError(
            f"{json_file}: {len(absent)} of {len(data['images'])} image files are missing under {image_root}: "
            f"{_quote(absent)}"
        )
    return data


def register_coco_format_dataset(
    name: str, json_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike]
) -> str:
    """Validate a COCO instances dataset, then register it with Detectron2 under ``name``.

    Calls :func:`validate_coco_instances` (see there for the errors), then Detectron2's
    ``register_coco_instances``; the dataset is then usable in ``DATASETS.TRAIN/TEST`` and by
    ``COCOEvaluator``. Registering the same (name, json_file, image_root) again does
    nothing; registering a name that is already taken by another dataset raises
    ``ValueError``. Returns ``name``.
    """
    json_abs = str(Path(json_file).expanduser().resolve())
    root_abs = str(Path(image_root).expanduser().resolve())
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old_json, old_root = meta.get("json_file"), meta.get("image_root")
        same = (
            old_json is not None
            and old_root is not None
            and str(Path(old_json).resolve()) == json_abs
            and str(Path(old_root).resolve()) == root_abs
        )
        if same:
            return name
        raise ValueError(
            f"dataset name '{name}' is already registered to json_file={old_json}, image_root={old_root}; "
            f"cannot register it again to json_file={json_abs}, image_root={root_abs}. Choose another name."
        )
    data = validate_coco_instances(json_abs, root_abs)
    logger.info(
        "Registering COCO-format dataset '%s': %s (%d images, %d annotations, %d categories), images in %s",
        name, json_abs, len(data["images"]), len(data["annotations"]), len(data["categories"]), root_abs,
    )
    register_coco_instances(name, {}, json_abs, root_abs)
    return name
