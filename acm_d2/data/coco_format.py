"""Checked registration of users' own COCO-format instance datasets.

:func:`register_coco_format_dataset` validates the files before anything trains, so a wrong
path, a broken JSON or a bad record fails at once with a message that names the file, the
record (image id, annotation id) and what to do, instead of deep inside the data loader
(minutes or hours in), or, worse, silently: Detectron2 flips boxes of negative width, drops
polygons with fewer than 3 points, and only its evaluator needs ``area`` and ``iscrowd``.

What :func:`validate_coco_instances` checks:

* the JSON: an object with lists ``images``, ``annotations`` and a non-empty ``categories``;
  every record an object with integer ``id`` (unique per list);
* categories: a non-empty string ``name``, unique (COCO evaluation reports AP by name);
* images: a non-empty string ``file_name``, positive integer ``width`` and ``height``;
* annotations: ``image_id`` and ``category_id`` that exist; ``bbox`` four finite numbers
  ``[x, y, width, height]`` with width, height > 0, inside the image (up to
  :data:`BOX_TOLERANCE` pixels); ``area`` a finite number >= 0 and ``iscrowd`` 0 or 1 (COCO
  evaluation needs both); ``segmentation``, if given, polygons (each an even number >= 6 of
  finite coordinates inside the image) or an RLE (``size`` the image's ``[height, width]``,
  ``counts`` that add up to height * width); if some annotations have masks, every
  non-crowd annotation must have one (Detectron2 fails on batches that mix them);
* coordinates in the pixel frame: a polygon's extent agrees with its bbox (within
  :data:`POLYGON_BOX_TOLERANCE` of the box's size, at least 2 px; swapped x and y are named
  as such), and images of :data:`NORMALISED_MIN_SIZE` px or more whose every coordinate lies
  within 0..1 (normalised coordinates) are refused, as is a data set whose every coordinate
  does on images all larger than :data:`NORMALISED_DATASET_MIN_SIZE` px;
* the image files (``check_images``), by :func:`acm_d2.data.image_check.check_image_files`:
  inside the image folder (unless ``allow_outside_root``), regular files, decoded in full
  once (the result cached by path, size and mtime), with pixels that Detectron2's reader does
  not clip (no 16-bit, 32-bit or float images), of the size the JSON says after the EXIF
  rotation Detectron2 applies.

:func:`check_num_classes` compares ``MODEL.ROI_HEADS.NUM_CLASSES`` (or
``MODEL.RETINANET.NUM_CLASSES``) with the categories of the training datasets, and
:func:`check_same_categories` the categories (ids and names, in class order) of the training
and test datasets; :class:`acm_d2.engine.ResumableTrainer` calls both before it builds the model.
"""
import itertools
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .image_check import MISSING, check_image_files

__all__ = [
    "BOX_TOLERANCE",
    "CocoFormatError",
    "check_num_classes",
    "check_same_categories",
    "register_coco_format_dataset",
    "validate_coco_instances",
]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW = 5  # how many offending values to quote in a one-line message
_SHOW_PROBLEMS = 10  # how many problem lines a CocoFormatError lists
#: Pixels by which a box or polygon may leave its image (rounding in annotation tools).
BOX_TOLERANCE = 1.0
#: How far (a fraction of the box's larger side, at least 2 px) a polygon's extent may be from its bbox.
POLYGON_BOX_TOLERANCE = 0.1
#: Images at least this large (px, the larger side) whose annotations all lie within 0..1 are refused.
NORMALISED_MIN_SIZE = 100
#: A data set whose every annotation lies within 0..1 on images all larger than this (px) is refused.
NORMALISED_DATASET_MIN_SIZE = 4


class CocoFormatError(ValueError):
    """A COCO-format dataset that cannot be registered; the message says why."""


def _quote(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _SHOW else "")


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return type(value) is int  # not bool


_NUMBER_TYPES = {int, float}


def _is_number(value) -> bool:
    return type(value) in _NUMBER_TYPES  # not bool


def _all_finite(values) -> bool:
    """Whether every number is finite (an integer too large for a float is not)."""
    try:
        return all(map(math.isfinite, values))
    except OverflowError:
        return False


def _is_size(value) -> bool:
    """A positive integer (640 or 640.0)."""
    return _is_number(value) and _all_finite([value]) and value > 0 and float(value).is_integer()


class _Problems:
    """Problems found in one file: (kind, record, detail); raised together."""

    def __init__(self, json_file: Path):
        self.json_file = json_file
        self.items: List[Tuple[str, str, str]] = []

    def add(self, kind: str, record: str, detail: str) -> None:
        self.items.append((kind, record, detail))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = [f"  {record}: {detail}" for _, record, detail in self.items[:_SHOW_PROBLEMS]]
        if len(self.items) > _SHOW_PROBLEMS:
            kinds = Counter(kind for kind, _, _ in self.items)
            lines.append(
                f"  ... {len(self.items)} problems in all: "
                + ", ".join(f"{count} x {kind}" for kind, count in kinds.most_common())
            )
        raise CocoFormatError(
            f"{self.json_file}: {len(self.items)} problem{'s' if len(self.items) > 1 else ''} found; "
            f"fix these records (or remove them) and register the dataset again:\n" + "\n".join(lines)
        )


def _load_json(json_file: Path):
    try:
        with open(json_file, "rb") as f:
            return json.loads(f.read())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CocoFormatError(f"{json_file} is not valid JSON: {e}") from e
    except OSError as e:
        raise CocoFormatError(f"{json_file} cannot be read: {e}") from e


def _check_top_level(json_file: Path, data) -> None:
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
    if not data["categories"]:
        raise CocoFormatError(
            f"{json_file}: 'categories' is empty; list every category as "
            f'{{"id": 1, "name": "..."}} (the model predicts one class per category)'
        )


def _records_with_ids(key: str, records: list, problems: _Problems) -> Dict[int, dict]:
    """The records of ``data[key]`` that are objects with a unique integer id, by id."""
    by_id: Dict[int, dict] = {}
    for position, record in enumerate(records):
        where = f"{key}[{position}]"
        if not isinstance(record, dict):
            problems.add(f"{key} entry not an object", where, f"is {_short(record)}, expected an object")
            continue
        record_id = record.get("id")
        if not _is_int(record_id):
            problems.add(f"{key} id not an integer", where, f"'id' is {_short(record_id) if 'id' in record else 'missing'}; give every entry a unique integer id")
        elif record_id in by_id:
            problems.add(f"duplicate {key} id", where, f"id {record_id} is used twice; ids must be unique in '{key}'")
        else:
            by_id[record_id] = record
    return by_id


def _check_categories(categories: Dict[int, dict], problems: _Problems) -> None:
    ids_by_name: Dict[str, List[int]] = {}
    for cat_id, cat in categories.items():
        name = cat.get("name")
        if not isinstance(name, str) or not name:
            problems.add("category without name", f"category id {cat_id}", f"'name' is {_short(name) if 'name' in cat else 'missing'}; expected a non-empty string")
        else:
            ids_by_name.setdefault(name, []).append(cat_id)
    for name, ids in ids_by_name.items():
        if len(ids) > 1:
            problems.add(
                "duplicate category name", f"category ids {', '.join(map(str, sorted(ids)))}",
                f"share the name {_short(name)}; names must be unique (COCO evaluation reports AP by name, so one "
                f"of them would be lost): rename one, or merge them into one id",
            )


def _check_images(images: Dict[int, dict], problems: _Problems) -> None:
    for image_id, img in images.items():
        where = f"image id {image_id}"
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            problems.add("bad file_name", where, f"'file_name' is {_short(name) if 'file_name' in img else 'missing'}; expected the image's path under the image folder, a string")
        for key in ("width", "height"):
            if not _is_size(img.get(key)):
                problems.add(f"bad image {key}", where, f"'{key}' is {_short(img.get(key)) if key in img else 'missing'}; expected the image's {key} in pixels, a positive integer")


def _image_size(img: dict) -> Optional[Tuple[float, float]]:
    if _is_size(img.get("width")) and _is_size(img.get("height")):
        return float(img["width"]), float(img["height"])
    return None


def _check_bbox(bbox, size, problems: _Problems, where: str) -> None:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        problems.add("bad bbox", where, f"bbox {_short(bbox)} is not four numbers [x, y, width, height]")
        return
    if not _all_finite(bbox):
        problems.add("non-finite bbox", where, f"bbox {_short(bbox)} has NaN or infinite values")
        return
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        problems.add(
            "bbox with width or height <= 0", where,
            f"bbox {_short(bbox)} has width {w} and height {h}; COCO boxes are [x, y, width, height] with "
            f"width, height > 0 (is it [x1, y1, x2, y2]?)",
        )
        return
    if size is not None:
        width, height = size
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            problems.add(
                "bbox outside the image", where,
                f"bbox {_short(bbox)} (x {x} to {x + w}, y {y} to {y + h}) leaves the {width:g}x{height:g} image "
                f"by more than {t:g} px; clip it to the image or fix the image's width/height",
            )


def _rle_string_counts(counts: str) -> Optional[List[int]]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString), or None
    if the string is not one."""
    runs: List[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None
            c = ord(counts[position]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            position += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_segmentation(segm, size, problems: _Problems, where: str) -> bool:
    """Check ``segm``; return whether it is a non-empty segmentation."""
    if isinstance(segm, list):
        if not segm:
            return False
        t = BOX_TOLERANCE
        for i, polygon in enumerate(segm):
            if not isinstance(polygon, list) or not set(map(type, polygon)) <= _NUMBER_TYPES:  # C speed
                problems.add("bad polygon", where, f"segmentation polygon {i} is {_short(polygon)}, not a list of numbers [x1, y1, x2, y2, ...]")
            elif len(polygon) < 6 or len(polygon) % 2:
                problems.add(
                    "polygon with < 3 points or odd length", where,
                    f"segmentation polygon {i} has {len(polygon)} coordinates; a polygon needs an even number, at "
                    f"least 6 (3 points) (Detectron2 would drop the whole annotation); remove the polygon",
                )
            elif not _all_finite(polygon):
                problems.add("non-finite polygon", where, f"segmentation polygon {i} has NaN or infinite coordinates")
            elif size is not None and (
                min(polygon[0::2]) < -t or min(polygon[1::2]) < -t
                or max(polygon[0::2]) > size[0] + t or max(polygon[1::2]) > size[1] + t
            ):
                problems.add(
                    "polygon outside the image", where,
                    f"segmentation polygon {i} (x {min(polygon[0::2])} to {max(polygon[0::2])}, y "
                    f"{min(polygon[1::2])} to {max(polygon[1::2])}) leaves the {size[0]:g}x{size[1]:g} image by more than {t:g} px",
                )
        return True
    if isinstance(segm, dict):
        rle_size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) and v > 0 for v in rle_size)):
            problems.add("bad RLE", where, f"RLE 'size' is {_short(rle_size)}; expected [height, width] of the image")
            return True
        if size is not None and rle_size != [int(size[1]), int(size[0])]:
            problems.add("RLE size differs from the image", where, f"RLE 'size' {rle_size} is not the image's [height, width] [{size[1]:g}, {size[0]:g}]")
            return True
        if isinstance(counts, str):
            runs = _rle_string_counts(counts)
        elif isinstance(counts, list) and all(_is_int(v) for v in counts):
            runs = counts
        else:
            problems.add("bad RLE", where, f"RLE 'counts' is {_short(counts)}; expected a compressed RLE string or a list of run lengths")
            return True
        total = rle_size[0] * rle_size[1]
        if runs is None:
            problems.add("bad RLE", where, "RLE 'counts' is a string that is not a compressed COCO RLE (pycocotools' encoding)")
        elif any(r < 0 for r in runs):
            problems.add("bad RLE", where, "RLE 'counts' has negative run lengths")
        elif sum(runs) != total:
            problems.add(
                "bad RLE", where,
                f"RLE 'counts' add up to {sum(runs)} pixels, not the {total} of its {rle_size[0]}x{rle_size[1]} 'size'",
            )
        return True
    problems.add("bad segmentation", where, f"segmentation is {_short(segm)}; expected a list of polygons or an RLE object")
    return True


def _valid_box(bbox) -> Optional[Tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) of a bbox that passed the checks (four finite numbers, w, h > 0), else None."""
    if isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox) and _all_finite(bbox):
        x, y, w, h = bbox
        if w > 0 and h > 0:
            return x, y, x + w, y + h
    return None


def _polygon_extent(segm) -> Optional[Tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) around all polygons of a polygon segmentation that passed the checks, else None."""
    if not isinstance(segm, list) or not segm:
        return None
    xs, ys = [], []
    for polygon in segm:
        if not (isinstance(polygon, list) and set(map(type, polygon)) <= _NUMBER_TYPES and len(polygon) >= 6
                and not len(polygon) % 2 and _all_finite(polygon)):
            return None
        xs += polygon[0::2]
        ys += polygon[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _extent_tolerance(box) -> float:
    """How far a polygon's extent may be from its bbox: :data:`POLYGON_BOX_TOLERANCE` of the
    box's larger side, at least 2 x :data:`BOX_TOLERANCE` pixels."""
    return max(2 * BOX_TOLERANCE, POLYGON_BOX_TOLERANCE * max(box[2] - box[0], box[3] - box[1]))


def _check_polygon_fits_box(segm, box, problems: _Problems, where: str) -> None:
    extent = _polygon_extent(segm)
    if extent is None or box is None:
        return
    t = _extent_tolerance(box)
    if max(abs(a - b) for a, b in zip(extent, box)) <= t:
        return
    swapped = (extent[1], extent[0], extent[3], extent[2])
    hint = (
        "its x and y are swapped: COCO polygons are [x1, y1, x2, y2, ...]"
        if max(abs(a - b) for a, b in zip(swapped, box)) <= t
        else "the bbox should be the polygons' extent [min x, min y, max x - min x, max y - min y]"
    )
    problems.add(
        "polygon disagrees with its bbox", where,
        f"the segmentation spans x {extent[0]:g} to {extent[2]:g}, y {extent[1]:g} to {extent[3]:g}, but the bbox "
        f"spans x {box[0]:g} to {box[2]:g}, y {box[1]:g} to {box[3]:g} (more than {t:g} px apart); {hint}",
    )


def _check_pixel_frame(largest: Dict[int, float], images: Dict[int, dict], problems: _Problems) -> None:
    """Refuse images of at least :data:`NORMALISED_MIN_SIZE` px whose every annotation lies within
    0..1, and a data set whose every annotation does, on images all larger than
    :data:`NORMALISED_DATASET_MIN_SIZE` px (``largest``: image id -> its largest coordinate)."""
    normalised = []
    for image_id, high in largest.items():
        size = _image_size(images.get(image_id, {}))
        if size is not None and max(size) >= NORMALISED_MIN_SIZE and high <= 1.0:
            normalised.append(image_id)
    fix = "COCO uses pixels; multiply x and widths by the image width, y and heights by its height"
    if normalised:
        problems.add(
            "normalised coordinates", "annotations",
            f"on {len(normalised)} images of {NORMALISED_MIN_SIZE} px or more (image ids {_quote(normalised)}) every "
            f"bbox and polygon coordinate is within 0..1: these look like coordinates normalised to the image "
            f"size, but {fix}",
        )
        return
    sizes = [_image_size(images.get(image_id, {})) for image_id in largest]
    if largest and all(high <= 1.0 for high in largest.values()) and all(
            size is not None and max(size) > NORMALISED_DATASET_MIN_SIZE for size in sizes):
        sides = [max(size) for size in sizes]
        problems.add(
            "normalised coordinates", "annotations",
            f"every bbox and polygon coordinate of the data set ({len(largest)} annotated images of {min(sides):g} to "
            f"{max(sides):g} px) is within 0..1: these look like coordinates normalised to the image size, but {fix}",
        )


def _check_annotations(
    annotations: Dict[int, dict], images: Dict[int, dict], category_ids: Iterable[int], problems: _Problems
) -> None:
    category_ids = set(category_ids)
    sizes = {image_id: _image_size(img) for image_id, img in images.items()}
    orphan, unknown = {}, {}
    with_mask, without_mask = [], []
    largest: Dict[int, float] = {}  # image id -> largest coordinate of its boxes and polygons
    for ann_id, ann in annotations.items():
        image_id = ann.get("image_id")
        where = f"annotation id {ann_id} (image id {_short(image_id)})"
        if not _is_int(image_id) or image_id not in images:
            orphan.setdefault(_short(image_id), ann_id)
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            unknown.setdefault(_short(ann.get("category_id")), ann_id)
        size = sizes.get(image_id) if _is_int(image_id) else None
        if "bbox" not in ann:
            problems.add("missing bbox", where, "no 'bbox'; every annotation needs [x, y, width, height]")
        else:
            _check_bbox(ann["bbox"], size, problems, where)
        crowd = ann.get("iscrowd", None)
        if not (_is_int(crowd) and crowd in (0, 1)):
            problems.add("bad iscrowd", where, f"'iscrowd' is {_short(crowd) if 'iscrowd' in ann else 'missing'}; expected 0 or 1 (COCO evaluation needs it)")
        area = ann.get("area")
        if not (_is_number(area) and _all_finite([area]) and area >= 0):
            problems.add("bad area", where, f"'area' is {_short(area) if 'area' in ann else 'missing'}; expected the object's area in pixels, a number >= 0 (COCO evaluation needs it; width * height of the box will do)")
        has_mask = "segmentation" in ann and _check_segmentation(ann["segmentation"], size, problems, where)
        box = _valid_box(ann.get("bbox"))
        if has_mask:
            _check_polygon_fits_box(ann["segmentation"], box, problems, where)
        if box is not None and _is_int(image_id):
            extent = _polygon_extent(ann.get("segmentation"))
            high = max(map(abs, box + (extent or ())))
            largest[image_id] = max(largest.get(image_id, 0.0), high)
        if crowd != 1:
            (with_mask if has_mask else without_mask).append(ann_id)
    _check_pixel_frame(largest, images, problems)
    if orphan:
        problems.add(
            "unknown image id", "annotations",
            f"refer to image ids that are not in 'images': {', '.join(list(orphan)[:_SHOW])} "
            f"(annotation ids {_quote(orphan.values())})",
        )
    if unknown:
        problems.add(
            "unknown category id", "annotations",
            f"refer to category ids that are not in 'categories': {', '.join(list(unknown)[:_SHOW])} "
            f"(annotation ids {_quote(unknown.values())})",
        )
    if with_mask and without_mask:
        problems.add(
            "annotation without mask", "annotations",
            f"{len(without_mask)} of {len(with_mask) + len(without_mask)} non-crowd annotations have no (or an empty) "
            f"segmentation while the others have one (annotation ids {_quote(without_mask)}); Detectron2 fails on "
            f"batches that mix them: give every annotation a polygon or RLE, or none (a box-only dataset)",
        )


def _check_image_files(image_root: Path, images: Dict[int, dict], problems: _Problems, allow_outside_root: bool) -> None:
    named = {i: img["file_name"] for i, img in images.items() if isinstance(img.get("file_name"), str) and img["file_name"]}
    results = check_image_files(image_root, named, allow_outside_root=allow_outside_root)
    absent = [named[i] for i, r in results.items() if r == MISSING]
    if absent:
        problems.add(
            "missing image file", "images",
            f"{len(absent)} of {len(images)} image files are missing under {image_root}: {_quote(absent)}",
        )
    rotated = {}
    for image_id, result in results.items():
        where = f"image id {image_id} ({named[image_id]})"
        if result == MISSING:
            continue
        if isinstance(result, str):
            problems.add("unreadable image", where, f"the file {result}; replace it, or remove the image and its annotations")
            continue
        size = _image_size(images[image_id])
        if size is not None and (float(result[0]), float(result[1])) != size:
            problems.add(
                "image size differs from the JSON", where,
                f"the file is {result[0]}x{result[1]} pixels (width x height, after EXIF rotation) but the JSON says "
                f"width {images[image_id]['width']}, height {images[image_id]['height']}; fix the JSON (Detectron2 "
                f"would stop when it first draws this image)",
            )
        elif result[2] != 1:
            rotated[image_id] = result[2]
    if rotated:
        _warn_rotated(image_root, named, rotated)


#: What Detectron2's read_image does to an image of each EXIF orientation before the model sees it.
_EXIF_TRANSFORMS = {2: "mirrors it left-right", 3: "rotates it by 180 degrees", 4: "mirrors it top-bottom",
                    5: "transposes it", 6: "rotates it by 90 degrees", 7: "transverses it", 8: "rotates it by 270 degrees"}


def _warn_rotated(image_root: Path, named: Dict[int, str], rotated: Dict[int, int]) -> None:
    """A WARNING naming the images Detectron2 will turn by their EXIF orientation: their size
    fits the JSON either way (or fits it after the turn), so whether the boxes and masks were
    drawn on the stored or on the turned pixels cannot be told from the files."""
    by_orientation: Dict[int, List[str]] = {}
    for image_id, orientation in sorted(rotated.items()):
        by_orientation.setdefault(orientation, []).append(f"{named[image_id]!r} (image id {image_id})")
    lines = [f"EXIF orientation {o}: {len(names)} image(s), which Detectron2 {_EXIF_TRANSFORMS[o]}: "
             + ", ".join(names[:_SHOW]) + (f", ... ({len(names)} in all)" if len(names) > _SHOW else "")
             for o, names in sorted(by_orientation.items())]
    logger.warning(
        "%d of the images under %s carry an EXIF orientation, which Detectron2's read_image applies before the model "
        "sees them:\n  %s\nThe annotations must be drawn on the turned images (as a photo viewer shows them); if they "
        "were drawn on the stored pixels, the boxes and masks are misplaced. Then remove the EXIF orientation "
        "(e.g. PIL: ImageOps.exif_transpose, or save the pixels without EXIF) or turn the annotations.",
        len(rotated), image_root, "\n  ".join(lines),
    )


def validate_coco_instances(
    json_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], check_images: bool = True,
    allow_outside_root: bool = False,
) -> dict:
    """Check ``json_file`` and ``image_root`` of a COCO instances dataset; return the JSON.

    See the module docstring for what is checked. ``check_images=False`` skips opening the
    image files (then only their existence is checked). ``allow_outside_root``: accept image
    files that resolve to a path outside ``image_root`` (absolute names, ``..``, symlinks).

    Raises:
        FileNotFoundError: the JSON file or the image folder does not exist.
        CocoFormatError: anything else; the message names the file and lists the offending
            records (image id, annotation id, position) with what to do.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {json_file} does not exist (or is not a file)")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} (for {json_file}) does not exist (or is not a folder)")
    data = _load_json(json_file)
    _check_top_level(json_file, data)

    problems = _Problems(json_file)
    categories = _records_with_ids("categories", data["categories"], problems)
    images = _records_with_ids("images", data["images"], problems)
    annotations = _records_with_ids("annotations", data["annotations"], problems)
    _check_categories(categories, problems)
    _check_images(images, problems)
    _check_annotations(annotations, images, categories, problems)
    if check_images:
        _check_image_files(image_root, images, problems, allow_outside_root)
    else:
        absent = [img["file_name"] for img in images.values() if isinstance(img.get("file_name"), str) and not (image_root / img["file_name"]).is_file()]
        if absent:
            problems.add("missing image file", "images", f"{len(absent)} of {len(images)} image files are missing under {image_root}: {_quote(absent)}")
    problems.raise_if_any()
    return data


def register_coco_format_dataset(
    name: str, json_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], check_images: bool = True,
    allow_outside_root: bool = False,
) -> str:
    """Validate a COCO instances dataset, then register it with Detectron2 under ``name``.

    Calls :func:`validate_coco_instances` (see there for the errors), then Detectron2's
    ``register_coco_instances`` with ``thing_classes`` (the category names in id order, as
    Detectron2's loader orders them) in the metadata, so :func:`check_num_classes` works
    without loading the dataset, and ``thing_dataset_id_to_contiguous_id`` (as Detectron2's
    loader sets it), so :func:`check_same_categories` compares ids and names. The dataset is then usable in ``DATASETS.TRAIN/TEST`` and by
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
    data = validate_coco_instances(json_abs, root_abs, check_images=check_images, allow_outside_root=allow_outside_root)
    logger.info(
        "Registering COCO-format dataset '%s': %s (%d images, %d annotations, %d categories), images in %s",
        name, json_abs, len(data["images"]), len(data["annotations"]), len(data["categories"]), root_abs,
    )
    categories = sorted(data["categories"], key=lambda c: c["id"])
    metadata = {
        "thing_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }
    register_coco_instances(name, metadata, json_abs, root_abs)
    return name


def _num_classes_setting(cfg) -> Optional[str]:
    """The config key with the number of classes the model predicts, or None."""
    meta = cfg.MODEL.META_ARCHITECTURE  # e.g. "GeneralizedRCNN", "ACMRetinaNet"
    if "RetinaNet" in meta:
        return "MODEL.RETINANET.NUM_CLASSES"
    if "RCNN" in meta or "PanopticFPN" in meta:  # PanopticFPN: a Mask R-CNN with a semantic head
        return "MODEL.ROI_HEADS.NUM_CLASSES"
    return None


def check_num_classes(cfg, dataset_names: Optional[Sequence[str]] = None) -> None:
    """Check that the model predicts as many classes as the datasets have categories.

    Compares ``MODEL.ROI_HEADS.NUM_CLASSES`` (R-CNN and PanopticFPN meta-architectures) or
    ``MODEL.RETINANET.NUM_CLASSES`` (RetinaNet, ACMRetinaNet) with the number of ``thing_classes`` in the metadata of
    ``dataset_names`` (default ``DATASETS.TRAIN``). Datasets whose metadata has no
    ``thing_classes`` yet (registered without them and not loaded) are not checked.

    Raises:
        ValueError: the setting is smaller than a dataset's number of categories (the extra
            categories would be trained as background, or crash the loss); the message names
            the setting, the datasets and the value to set. A larger setting only logs a
            warning (classes that are never trained).
    """
    key = _num_classes_setting(cfg)
    names = list(cfg.DATASETS.TRAIN if dataset_names is None else dataset_names)
    if key is None or not names:
        return
    value = cfg.MODEL.RETINANET.NUM_CLASSES if key.startswith("MODEL.RETINANET") else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    setting = "DATASETS.TRAIN" if dataset_names is None else "the datasets"
    counts = {}
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes") if name in MetadataCatalog.list() else None
        if classes is None:
            logger.info("Dataset '%s' has no thing_classes in its metadata yet: %s not checked against it", name, key)
        else:
            counts[name] = list(classes)
    if not counts:
        return
    largest = max(len(c) for c in counts.values())
    described = ", ".join(
        f"'{n}' has {len(c)} ({_quote(c)})" for n, c in counts.items()
    )
    if value < largest:
        raise ValueError(
            f"{key}={value}, but {setting} {names} have more categories: {described}. The model would "
            f"train the categories beyond {value} as background (or fail in the loss). Set {key} {largest}."
        )
    if value > largest:
        logger.warning(
            "%s=%d, but %s %s have at most %d categories (%s): %d classes of the model are never trained",
            key, value, setting, names, largest, described, value - largest,
        )


def _categories_of(name: str) -> Optional[List[Tuple[Optional[int], str]]]:
    """[(dataset id or None, name)] in the model's class order, from the metadata; None if unknown."""
    if name not in MetadataCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes")
    if classes is None:
        return None
    id_map = meta.get("thing_dataset_id_to_contiguous_id")
    ids: List[Optional[int]] = [None] * len(classes)
    if id_map:
        for dataset_id, index in id_map.items():
            if 0 <= index < len(ids):
                ids[index] = dataset_id
    return list(zip(ids, classes))


def check_same_categories(cfg, dataset_names: Optional[Sequence[str]] = None) -> None:
    """Check that the datasets of one run (default ``DATASETS.TRAIN`` + ``DATASETS.TEST``) have
    the same categories, by id and name, in the same class order.

    The model predicts class indices; a test set whose categories are the training set's in
    another order (or with other ids) is evaluated against the wrong names, and only the
    number of classes would be compared otherwise. Datasets whose metadata has no
    ``thing_classes`` yet are skipped (checked again once they are loaded).

    Raises:
        ValueError: naming both datasets, their settings (DATASETS.TRAIN / DATASETS.TEST) and
            the first differing classes.
    """
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if dataset_names is None else list(dataset_names)
    setting = {n: "DATASETS.TRAIN" for n in cfg.DATASETS.TRAIN}
    for n in cfg.DATASETS.TEST:
        setting.setdefault(n, "DATASETS.TEST")
    known = [(n, c) for n, c in ((n, _categories_of(n)) for n in dict.fromkeys(names)) if c is not None]
    if len(known) < 2:
        return
    first, reference = known[0]
    for other, categories in known[1:]:
        with_ids = all(i is not None for i, _ in reference + categories)
        a = reference if with_ids else [(None, n) for _, n in reference]
        b = categories if with_ids else [(None, n) for _, n in categories]
        if a == b:
            continue

        def show(entry):
            return f"id {entry[0]} {entry[1]!r}" if entry[0] is not None else repr(entry[1])

        differences = [
            f"class {k}: {show(x) if x else 'none'} vs {show(y) if y else 'none'}"
            for k, (x, y) in enumerate(itertools.zip_longest(a, b))
            if x != y
        ]
        raise ValueError(
            f"The datasets of this run have different categories: '{first}' ({setting.get(first, 'dataset')}, "
            f"{len(reference)} categories) and '{other}' ({setting.get(other, 'dataset')}, {len(categories)}) differ "
            f"in {len(differences)} classes ({'; '.join(differences[:_SHOW])}"
            f"{'; ...' if len(differences) > _SHOW else ''}). The model's class k would be evaluated or trained "
            f"as another category. Give both JSON files the same 'categories' (same ids and names), or use "
            f"datasets that share them."
        )
