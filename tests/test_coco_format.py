"""register_coco_format_dataset: checks before training, clear messages naming the file and
the record, idempotence; never a raw Python error from inside the validator."""
import copy
import io
import itertools
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_utils

from acm_d2.data import CocoFormatError, check_num_classes, register_coco_format_dataset, validate_coco_instances
from conftest import acm_cfg


@pytest.fixture(autouse=True)
def _image_check_cache(tmp_path, monkeypatch):
    """Each test its own image-check cache (the decode results of registration)."""
    monkeypatch.setenv("ACM_D2_CHECK_CACHE", str(tmp_path / "image_checks"))


def _name():
    return f"test_coco_{uuid.uuid4().hex[:8]}"


def _png(path, width=8, height=8):
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)


@pytest.fixture()
def dataset(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0,
             "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images, data


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _problems(tmp_path, images, data):
    """The CocoFormatError message for ``data``, asserting that nothing is registered."""
    path = _write(tmp_path / f"{uuid.uuid4().hex[:6]}.json", data)
    name = _name()
    with pytest.raises(CocoFormatError) as info:
        register_coco_format_dataset(name, path, images)
    assert name not in DatasetCatalog.list()
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def test_registers_and_loads(dataset):
    path, images, _ = dataset
    name = _name()
    assert register_coco_format_dataset(name, path, images) == name
    assert MetadataCatalog.get(name).json_file == str(path.resolve())
    assert MetadataCatalog.get(name).evaluator_type == "coco"
    assert MetadataCatalog.get(name).thing_classes == ["thing"]  # for check_num_classes, before loading
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 1 and len(dicts[0]["annotations"]) == 1
    # idempotent for the same triple, also spelled differently
    assert register_coco_format_dataset(name, str(path), str(images) + "/") == name


def test_registered_dataset_is_checked_against_num_classes(dataset):
    path, images, _ = dataset
    name = register_coco_format_dataset(_name(), path, images)
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", "DATASETS.TRAIN", f"('{name}',)", "MODEL.ROI_HEADS.NUM_CLASSES", "1")
    check_num_classes(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 0
    with pytest.raises(ValueError, match=f"^MODEL.ROI_HEADS.NUM_CLASSES=0, but DATASETS.TRAIN \\['{name}'\\]"):
        check_num_classes(cfg)


def test_name_taken_by_another_dataset(dataset, tmp_path):
    path, images, data = dataset
    name = _name()
    register_coco_format_dataset(name, path, images)
    other = _write(tmp_path / "other.json", data)
    with pytest.raises(ValueError, match=f"'{name}' is already registered to json_file={path.resolve()}"):
        register_coco_format_dataset(name, other, images)
    with pytest.raises(ValueError, match="'coco_2017_train' is already registered"):
        register_coco_format_dataset("coco_2017_train", path, images)


def test_missing_json(tmp_path, dataset):
    _, images, _ = dataset
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"COCO annotation file {missing} does not exist"):
        register_coco_format_dataset(_name(), missing, images)


def test_missing_image_folder(tmp_path, dataset):
    path, _, _ = dataset
    missing = tmp_path / "no_images"
    with pytest.raises(FileNotFoundError, match=f"image folder {missing} .* does not exist"):
        register_coco_format_dataset(_name(), path, missing)


@pytest.mark.parametrize("text, words", [("{not json", "is not valid JSON"), (b"\xff\xfe\x00binary", "is not valid JSON")])
def test_not_json(tmp_path, dataset, text, words):
    _, images, _ = dataset
    bad = tmp_path / "bad.json"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CocoFormatError, match=f"{bad} {words}"):
        register_coco_format_dataset(_name(), bad, images)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_key(tmp_path, dataset, key):
    _, images, data = dataset
    del data[key]
    path = _write(tmp_path / "nokey.json", data)
    with pytest.raises(CocoFormatError, match=rf"{path} is not COCO instances format: missing key\(s\) \['{key}'\]"):
        register_coco_format_dataset(_name(), path, images)


def test_not_an_object(tmp_path, dataset):
    _, images, _ = dataset
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(CocoFormatError, match="the top level is a list"):
        register_coco_format_dataset(_name(), path, images)


def test_no_categories(tmp_path, dataset):
    _, images, data = dataset
    data["categories"] = []
    assert "'categories' is empty; list every category" in _problems(tmp_path, images, data)


def test_annotation_with_unknown_image_id(tmp_path, dataset):
    _, images, data = dataset
    data["annotations"].append(dict(data["annotations"][0], id=2, image_id=42))
    data["annotations"].append(dict(data["annotations"][0], id=3, image_id=43))
    message = _problems(tmp_path, images, data)
    assert "annotations: refer to image ids that are not in 'images': 42, 43 (annotation ids 2, 3)" in message


def test_annotation_with_unknown_category(tmp_path, dataset):
    _, images, data = dataset
    data["annotations"][0]["category_id"] = 7
    assert "refer to category ids that are not in 'categories': 7 (annotation ids 1)" in _problems(tmp_path, images, data)


def test_missing_image_file(tmp_path, dataset):
    _, images, data = dataset
    data["images"].append({"id": 2, "file_name": "b.png", "height": 8, "width": 8})
    assert f"1 of 2 image files are missing under {images}: 'b.png'" in _problems(tmp_path, images, data)


# ------------------------------------------------------------------------------------ boxes
@pytest.mark.parametrize(
    "bbox, words",
    [
        ([6, 2, -2, 3], "bbox [6, 2, -2, 3] has width -2 and height 3; COCO boxes are [x, y, width, height] with width, height > 0"),
        ([1, 1, 3, 0], "bbox [1, 1, 3, 0] has width 3 and height 0"),
        ([1, math.nan, 3, 3], "bbox [1, NaN, 3, 3] has NaN or infinite values"),
        ([1, 1, math.inf, 3], "bbox [1, 1, Infinity, 3] has NaN or infinite values"),
        ([5, 1, 6, 3], "bbox [5, 1, 6, 3] (x 5 to 11, y 1 to 4) leaves the 8x8 image by more than 1 px"),
        ([-2, 1, 3, 3], "bbox [-2, 1, 3, 3] (x -2 to 1, y 1 to 4) leaves the 8x8 image"),
        ([1, 1, 3], "bbox [1, 1, 3] is not four numbers [x, y, width, height]"),
        ("1 1 3 3", 'bbox "1 1 3 3" is not four numbers'),
        ([1, 1, "3", 3], 'bbox [1, 1, "3", 3] is not four numbers'),
        ([1, 1, True, 3], "bbox [1, 1, true, 3] is not four numbers"),
    ],
)
def test_bad_box_names_the_annotation(tmp_path, dataset, bbox, words):
    _, images, data = dataset
    data["annotations"][0]["bbox"] = bbox
    data["annotations"][0].pop("segmentation")
    message = _problems(tmp_path, images, data)
    assert f"annotation id 1 (image id 1): {words}" in message


def test_box_within_tolerance_is_accepted(tmp_path, dataset):
    _, images, data = dataset
    data["annotations"][0]["bbox"] = [-0.5, 0, 8.9, 8.4]  # rounding of an annotation tool
    data["annotations"][0]["segmentation"] = [[-0.5, 0, 8.4, 0, 8.4, 8.4]]
    validate_coco_instances(_write(tmp_path / "ok.json", data), images)


def test_missing_bbox_area_iscrowd(tmp_path, dataset):
    _, images, data = dataset
    for key in ("bbox", "area", "iscrowd"):
        data["annotations"][0].pop(key)
    message = _problems(tmp_path, images, data)
    assert "annotation id 1 (image id 1): no 'bbox'" in message
    assert "'area' is missing; expected the object's area in pixels, a number >= 0 (COCO evaluation needs it" in message
    assert "'iscrowd' is missing; expected 0 or 1 (COCO evaluation needs it)" in message


# ---------------------------------------------------------------------------- segmentations
@pytest.mark.parametrize(
    "segmentation, words",
    [
        ([[1, 1, 4, 1]], "segmentation polygon 0 has 4 coordinates; a polygon needs an even number, at least 6 (3 points)"),
        ([[1, 1, 4, 1, 4, 4, 1]], "segmentation polygon 0 has 7 coordinates"),
        ([[1, 1, 4, 1, 4, 4], []], "segmentation polygon 1 has 0 coordinates"),
        ([[1, 1, 4, 1, 4, math.nan]], "segmentation polygon 0 has NaN or infinite coordinates"),
        ([[1, 1, 4, 1, 14, 4]], "segmentation polygon 0 (x 1 to 14, y 1 to 4) leaves the 8x8 image"),
        ([["1", 1, 4, 1, 4, 4]], 'segmentation polygon 0 is ["1", 1, 4, 1, 4, 4], not a list of numbers'),
        ([1, 1, 4, 1, 4, 4], "segmentation polygon 0 is 1, not a list of numbers"),
        ("polygon", 'segmentation is "polygon"; expected a list of polygons or an RLE object'),
        ({"size": [8, 8], "counts": [10, 5]}, "RLE 'counts' add up to 15 pixels, not the 64 of its 8x8 'size'"),
        ({"size": [8, 8], "counts": [70, -6]}, "RLE 'counts' has negative run lengths"),
        ({"size": [8, 8], "counts": "\x7f\x7f"}, "RLE 'counts' is a string that is not a compressed COCO RLE"),
        ({"size": [6, 8], "counts": [48]}, "RLE 'size' [6, 8] is not the image's [height, width] [8, 8]"),
        ({"size": "8x8", "counts": [64]}, "RLE 'size' is \"8x8\"; expected [height, width]"),
        ({"size": [8, 8], "counts": 64}, "RLE 'counts' is 64; expected a compressed RLE string or a list of run lengths"),
    ],
)
def test_bad_segmentation_names_the_annotation(tmp_path, dataset, segmentation, words):
    _, images, data = dataset
    data["annotations"][0]["segmentation"] = segmentation
    assert f"annotation id 1 (image id 1): {words}" in _problems(tmp_path, images, data)


def test_valid_rle(tmp_path, dataset):
    _, images, data = dataset
    mask = np.zeros((8, 8), dtype=np.uint8, order="F")
    mask[1:5, 2:7] = 1
    compressed = mask_utils.encode(mask)
    data["annotations"][0]["segmentation"] = {"size": [8, 8], "counts": compressed["counts"].decode()}
    data["annotations"].append(dict(data["annotations"][0], id=2, iscrowd=1, segmentation={"size": [8, 8], "counts": [8, 4, 52]}))
    validate_coco_instances(_write(tmp_path / "rle.json", data), images)
    truncated = compressed["counts"].decode()[:-1]
    data["annotations"][0]["segmentation"]["counts"] = truncated
    assert "annotation id 1 (image id 1): RLE 'counts' add up to 53 pixels, not the 64" in _problems(tmp_path, images, data)


def test_masks_all_or_none(tmp_path, dataset):
    _, images, data = dataset
    for i, segmentation in enumerate([[], None], start=2):
        extra = dict(data["annotations"][0], id=i, segmentation=segmentation)
        if segmentation is None:
            del extra["segmentation"]
        data["annotations"].append(extra)
    message = _problems(tmp_path, images, data)
    assert "2 of 3 non-crowd annotations have no (or an empty) segmentation while the others have one (annotation ids 2, 3)" in message
    # a box-only dataset is fine
    for ann in data["annotations"]:
        ann["segmentation"] = []
    validate_coco_instances(_write(tmp_path / "boxes.json", data), images)


# ----------------------------------------------------------------------------------- images
def _jpeg_bytes(width, height, orientation=None):
    buffer = io.BytesIO()
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, words",
    [
        ("truncated png", "is not a whole image"),
        ("truncated jpeg", "is not a whole image (ValueError: Premature end of JPEG file"),
        (b"<html>404</html>", "is not an image file PIL can read"),
    ],
)
def test_corrupt_image(tmp_path, dataset, content, words):
    _, images, data = dataset
    if content == "truncated png":
        full = (images / "a.png").read_bytes()
        content = full[: len(full) - 20]
    elif content == "truncated jpeg":
        data["images"][0].update(width=64, height=48, file_name="a.jpg")
        full = _jpeg_bytes(64, 48)
        content = full[: len(full) // 2]
    (images / data["images"][0]["file_name"]).write_bytes(content)
    message = _problems(tmp_path, images, data)
    assert f"image id 1 ({data['images'][0]['file_name']}): the file {words}" in message
    assert "replace it, or remove the image and its annotations" in message


def test_image_size_differs_from_json(tmp_path, dataset):
    _, images, data = dataset
    _png(images / "a.png", width=8, height=6)
    message = _problems(tmp_path, images, data)
    assert "image id 1 (a.png): the file is 8x6 pixels (width x height, after EXIF rotation) but the JSON says width 8, height 8" in message


def test_exif_rotation_is_applied_as_detectron2_does(tmp_path, dataset):
    _, images, data = dataset
    (images / "r.jpg").write_bytes(_jpeg_bytes(12, 8, orientation=6))  # stored 12x8, shown 8x12
    data["images"].append({"id": 2, "file_name": "r.jpg", "width": 8, "height": 12})
    path = _write(tmp_path / "exif.json", data)
    validate_coco_instances(path, images)
    name = register_coco_format_dataset(_name(), path, images)
    from detectron2.data import detection_utils

    d = [d for d in DatasetCatalog.get(name) if d["image_id"] == 2][0]
    detection_utils.check_image_size(d, detection_utils.read_image(d["file_name"], "BGR"))  # what training checks


def test_exif_orientations_are_named_before_training(tmp_path, dataset, caplog):
    """A 180-degree JPEG (orientation 3) keeps its size, so the size check cannot see that
    Detectron2 turns it: a WARNING names it and what Detectron2 does (from the cache too)."""
    _, images, data = dataset
    (images / "upside_down.jpg").write_bytes(_jpeg_bytes(12, 8, orientation=3))
    (images / "side.jpg").write_bytes(_jpeg_bytes(12, 8, orientation=6))  # the JSON gives the turned size
    (images / "plain.jpg").write_bytes(_jpeg_bytes(12, 8))
    data["images"] += [{"id": 2, "file_name": "upside_down.jpg", "width": 12, "height": 8},
                       {"id": 3, "file_name": "side.jpg", "width": 8, "height": 12},
                       {"id": 4, "file_name": "plain.jpg", "width": 12, "height": 8}]
    path = _write(tmp_path / "exif.json", data)
    for _ in range(2):  # decoded, then from the image-check cache
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="acm_d2.data.coco_format"):
            register_coco_format_dataset(_name(), path, images)
        warnings = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].startswith(f"2 of the images under {images} carry an EXIF orientation")
        assert "EXIF orientation 3: 1 image(s), which Detectron2 rotates it by 180 degrees: 'upside_down.jpg' (image id 2)" in warnings[0]
        assert "EXIF orientation 6: 1 image(s), which Detectron2 rotates it by 90 degrees: 'side.jpg' (image id 3)" in warnings[0]
        assert "plain.jpg" not in warnings[0] and "a.png" not in warnings[0]
        assert "ImageOps.exif_transpose" in warnings[0]


def test_check_images_off_skips_reading(tmp_path, dataset):
    _, images, data = dataset
    (images / "a.png").write_bytes(b"not an image")
    validate_coco_instances(_write(tmp_path / "x.json", data), images, check_images=False)


# ------------------------------------------------------------------- malformed JSON values
def test_malformed_records_are_named(tmp_path, dataset):
    _, images, data = dataset
    data["images"].append({"id": 2, "file_name": 7, "width": 8, "height": 0})
    data["images"].append({"id": 1, "file_name": "a.png", "width": 8, "height": 8})
    data["images"].append("a.png")
    data["annotations"].append(5)
    data["annotations"].append(dict(data["annotations"][0]))
    data["annotations"].append(dict(data["annotations"][0], id=True))
    data["categories"].append({"id": 2})
    data["categories"].append({"name": "nameless id"})
    message = _problems(tmp_path, images, data)
    for words in [
        "image id 2: 'file_name' is 7; expected the image's path under the image folder, a string",
        "image id 2: 'height' is 0; expected the image's height in pixels, a positive integer",
        "images[2]: id 1 is used twice; ids must be unique in 'images'",
        'images[3]: is "a.png", expected an object',
        "annotations[1]: is 5, expected an object",
        "annotations[2]: id 1 is used twice; ids must be unique in 'annotations'",
        "annotations[3]: 'id' is true; give every entry a unique integer id",
        "category id 2: 'name' is missing; expected a non-empty string",
        "categories[2]: 'id' is missing; give every entry a unique integer id",
    ]:
        assert words in message
    assert "9 problems found" in message


def test_many_problems_are_summarised(tmp_path, dataset):
    _, images, data = dataset
    ann = data["annotations"][0]
    data["annotations"] = [dict(ann, id=i, bbox=[1, 1, -1, 3]) for i in range(1, 31)]
    data["annotations"] += [dict(ann, id=i, area=None) for i in range(31, 36)]
    message = _problems(tmp_path, images, data)
    assert "35 problems found" in message
    assert message.count("\n  annotation id") == 10
    assert "... 35 problems in all: 30 x bbox with width or height <= 0, 5 x bad area" in message


_ODD_VALUES = [
    None, True, -1, 0, 2.5, math.nan, math.inf, 10**400, "x", "", "\x00", [], [[]], [1, 2], [10**400] * 6, {},
    {"counts": "x"}, {"size": [8, 8], "counts": [10**400]}, [None, "a", {}],
]


def test_no_raw_python_error_on_any_odd_value(tmp_path, dataset):
    """Every field of every record replaced by odd values: a CocoFormatError or success."""
    _, images, data = dataset
    paths = [("images", 0, k) for k in data["images"][0]] + [("annotations", 0, k) for k in data["annotations"][0]]
    paths += [("categories", 0, k) for k in data["categories"][0]]
    cases = [(p, v) for p, v in itertools.product(paths, _ODD_VALUES)]
    cases += [((key,), v) for key in ("images", "annotations", "categories") for v in _ODD_VALUES]
    cases += [((key, 0), v) for key in ("images", "annotations", "categories") for v in _ODD_VALUES]
    for path, value in cases:
        broken = copy.deepcopy(data)
        target = broken
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        json_file = _write(tmp_path / "odd.json", broken)
        try:
            validate_coco_instances(json_file, images)
        except CocoFormatError as e:  # refused: the message says what and where
            assert "odd.json" in str(e) or path[0] in str(e), (path, value, str(e))


# --------------------------------------------- what the model sees: pixels, files, frames
def _big_dataset(tmp_path, width=200, height=100, bbox=(10, 50, 100, 20), polygon=None):
    """One image of width x height with one annotation (polygon: the box's corners by default)."""
    images = tmp_path / "big"
    images.mkdir(exist_ok=True)
    _png(images / "a.png", width=width, height=height)
    x, y, w, h = bbox
    polygon = polygon or [x, y, x + w, y, x + w, y + h, x, y + h]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(bbox), "area": w * h, "iscrowd": 0,
                         "segmentation": [polygon]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return images, data


def test_images_the_reader_would_clip_are_refused(tmp_path, dataset):
    _, images, data = dataset
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0..63000: a 16-bit X-ray export
    Image.fromarray(ramp).save(images / "a.png")
    message = _problems(tmp_path, images, data)
    assert "image id 1 (a.png): the file is a 16-bit image (PIL mode I;16, values 0 to 63000)" in message
    assert "clips every value above 255 to white" in message and "x 255 / 65535" in message
    Image.fromarray((ramp // 1000).astype(np.uint16)).save(images / "a.png")  # 16-bit file, 8-bit values: faithful
    validate_coco_instances(_write(tmp_path / "ok.json", data), images)
    Image.fromarray(np.random.RandomState(0).rand(8, 8).astype(np.float32)).save(images / "f.tif")
    data["images"][0]["file_name"] = "f.tif"
    assert "image id 1 (f.tif): the file is a float image (PIL mode F, values" in _problems(tmp_path, images, data)


def _png_with_cut_image_data(path):
    """A PNG whose IDAT holds half its compressed data, with a valid checksum: PIL's verify()
    passes it, decoding fails."""
    import struct
    import zlib

    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    raw = path.read_bytes()
    start = raw.index(b"IDAT") - 4
    length = struct.unpack(">I", raw[start : start + 4])[0]
    cut = raw[start + 8 : start + 8 + length // 2]
    chunk = struct.pack(">I", len(cut)) + b"IDAT" + cut + struct.pack(">I", zlib.crc32(b"IDAT" + cut))
    path.write_bytes(raw[:start] + chunk + raw[start + 12 + length :])


def test_images_that_do_not_decode_in_full_are_refused(tmp_path, dataset):
    _, images, data = dataset
    full = _jpeg_bytes(64, 48)
    (images / "cut.jpg").write_bytes(full[: len(full) // 2] + b"\xff\xd9")  # PIL decodes it as grey rows
    _png_with_cut_image_data(images / "cut.png")
    with Image.open(images / "cut.png") as img:
        img.verify()  # what the earlier check relied on
    data["images"] = [
        {"id": 1, "file_name": "cut.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "cut.png", "width": 32, "height": 32},
    ]
    data["annotations"] = []
    message = _problems(tmp_path, images, data)
    assert "image id 1 (cut.jpg): the file is not a whole image (ValueError: Corrupt JPEG data: premature end of data segment)" in message
    assert "image id 2 (cut.png): the file is not a whole image (OSError:" in message
    # padding between two segments (libjpeg: "2 extraneous bytes before marker"): every pixel is there
    header = 4 + int.from_bytes(full[4:6], "big")  # SOI and the APP0 segment
    (images / "padded.jpg").write_bytes(full[:header] + b"\x12\x34" + full[header:])
    data["images"] = [{"id": 1, "file_name": "padded.jpg", "width": 64, "height": 48}]
    validate_coco_instances(_write(tmp_path / "padded.json", data), images)


def test_non_regular_files_and_paths_outside_the_root(tmp_path, dataset):
    _, images, data = dataset
    os.mkfifo(images / "fifo.png")  # opening it would block the loader forever
    _png(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    data["images"] = [
        {"id": 1, "file_name": "fifo.png", "width": 8, "height": 8},
        {"id": 2, "file_name": "../outside.png", "width": 8, "height": 8},
        {"id": 3, "file_name": str(tmp_path / "outside.png"), "width": 8, "height": 8},
        {"id": 4, "file_name": "link.png", "width": 8, "height": 8},
    ]
    data["annotations"] = []
    message = _problems(tmp_path, images, data)
    assert "image id 1 (fifo.png): the file is a FIFO, not a regular file" in message
    for image_id, name in [(2, "../outside.png"), (3, str(tmp_path / "outside.png")), (4, "link.png")]:
        assert f"image id {image_id} ({name}): the file is outside the image folder {images} (it resolves to {tmp_path / 'outside.png'}" in message
    assert message.count("DATASETS.COCO_ALLOW_OUTSIDE_ROOT True") == 3
    data["images"] = data["images"][1:]
    validate_coco_instances(_write(tmp_path / "allowed.json", data), images, allow_outside_root=True)


def test_every_image_is_decoded_once_then_cached(tmp_path, dataset, monkeypatch):
    import threading

    from acm_d2.data import image_check

    _, images, data = dataset
    for i in range(2, 7):
        _png(images / f"{i}.png")
        data["images"].append({"id": i, "file_name": f"{i}.png", "width": 8, "height": 8})
    decoded = []
    real_inspect = image_check.inspect_image
    monkeypatch.setattr(image_check, "inspect_image", lambda path: decoded.append(path) or real_inspect(path))
    path = _write(tmp_path / "six.json", data)
    # two processes (here threads: flock locks are per open file) register the same folder at once
    threads = [threading.Thread(target=validate_coco_instances, args=(path, images)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(decoded) == 6
    validate_coco_instances(path, images)
    assert len(decoded) == 6  # nothing decoded again
    _png(images / "3.png", width=8, height=6)  # changed file: new size and mtime
    assert "image id 3 (3.png): the file is 8x6 pixels" in _problems(tmp_path, images, data)
    assert [os.path.basename(p) for p in decoded[6:]] == ["3.png"]


def test_a_file_corrupted_in_place_is_decoded_again(tmp_path, dataset):
    """40 bytes zeroed inside a PNG, its size and mtime kept: not taken from the cache as whole."""
    _, images, data = dataset
    png = images / "a.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(png)
    data["images"][0].update(width=64, height=48)
    path = _write(tmp_path / "inplace.json", data)
    validate_coco_instances(path, images)  # checked and cached
    before = os.stat(png)
    content = bytearray(png.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 40] = bytes(40)
    with open(png, "r+b") as f:  # in place: same inode, same size
        f.write(content)
    os.utime(png, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(png)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert "image id 1 (a.png): the file is not a whole image" in _problems(tmp_path, images, data)


def test_a_small_image_data_set_in_normalised_coordinates_is_refused(tmp_path, dataset):
    """64 px images are below the per-image threshold (100 px): the whole data set decides."""
    _, images, data = dataset
    data["images"] = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2)]
    for i in (1, 2):
        _png(images / f"{i}.png", width=64, height=48)
    data["annotations"] = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [0.1, 0.2, 0.3, 0.4], "area": 0.12, "iscrowd": 0,
         "segmentation": [[0.1, 0.2, 0.4, 0.2, 0.4, 0.6, 0.1, 0.6]]} for i in (1, 2)]
    message = _problems(tmp_path, images, data)
    assert ("annotations: every bbox and polygon coordinate of the data set (2 annotated images of 64 to 64 px) is "
            "within 0..1") in message and "multiply x and widths by the image width" in message
    data["annotations"][1].update(bbox=[10, 10, 20, 20], area=400, segmentation=[[10, 10, 30, 10, 30, 30, 10, 30]])
    validate_coco_instances(_write(tmp_path / "pixels.json", data), images)  # one image in pixels: accepted


def test_annotations_in_the_wrong_frame_are_refused(tmp_path):
    images, data = _big_dataset(tmp_path, bbox=(0.1, 0.2, 0.3, 0.4))
    message = _problems(tmp_path, images, data)
    assert "annotations: on 1 images of 100 px or more (image ids 1) every bbox and polygon coordinate is within 0..1" in message
    assert "multiply x and widths by the image width" in message

    x, y, w, h = 10, 50, 100, 20
    swapped = [y, x, y, x + w, y + h, x + w, y + h, x]
    images, data = _big_dataset(tmp_path, bbox=(x, y, w, h), polygon=swapped)
    message = _problems(tmp_path, images, data)
    assert ("annotation id 1 (image id 1): the segmentation spans x 50 to 70, y 10 to 110, but the bbox spans x 10 to "
            "110, y 50 to 70 (more than 10 px apart); its x and y are swapped") in message
    images, data = _big_dataset(tmp_path, bbox=(x, y, w, h), polygon=[x + 3, y, x + w, y + 2, x + w - 4, y + h, x, y + h - 1])
    validate_coco_instances(_write(tmp_path / "close.json", data), images)  # within 10% of the box: accepted


def test_duplicate_category_names_are_refused(tmp_path, dataset):
    _, images, data = dataset
    data["categories"].append({"id": 2, "name": "thing"})
    assert 'category ids 1, 2: share the name "thing"; names must be unique' in _problems(tmp_path, images, data)


def test_train_and_test_categories_are_compared_by_id_and_name(tmp_path, dataset):
    from acm_d2.data import check_same_categories

    _, images, data = dataset
    data["categories"] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    train = register_coco_format_dataset(_name(), _write(tmp_path / "train.json", data), images)
    same = register_coco_format_dataset(_name(), _write(tmp_path / "same.json", data), images)
    data["categories"] = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]  # the same names, other ids
    swapped = register_coco_format_dataset(_name(), _write(tmp_path / "swapped.json", data), images)
    cfg = acm_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (same,)
    check_same_categories(cfg)
    cfg.DATASETS.TEST = (same, swapped)
    with pytest.raises(ValueError) as info:
        check_same_categories(cfg)
    assert (f"'{train}' (DATASETS.TRAIN, 2 categories) and '{swapped}' (DATASETS.TEST, 2) differ in 2 classes "
            f"(class 0: id 1 'cat' vs id 1 'dog'; class 1: id 2 'dog' vs id 2 'cat')") in str(info.value)
    from acm_d2.engine import ResumableTrainer

    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    with pytest.raises(ValueError, match="The datasets of this run have different categories"):
        ResumableTrainer(cfg)  # before the model is built


def test_train_net_passes_the_outside_root_setting(tmp_path, dataset):
    from argparse import Namespace

    from acm_d2.train_net import register_datasets

    _, images, data = dataset
    _png(tmp_path / "outside.png")
    data["images"][0]["file_name"] = "../outside.png"
    json_file = _write(tmp_path / "outside.json", data)
    cfg = acm_cfg()
    name = _name()
    with pytest.raises(CocoFormatError, match="allow it with DATASETS.COCO_ALLOW_OUTSIDE_ROOT True"):
        register_datasets(cfg, Namespace(register_coco=[[name, str(json_file), str(images)]]))
    cfg.DATASETS.COCO_ALLOW_OUTSIDE_ROOT = True
    register_datasets(cfg, Namespace(register_coco=[[name, str(json_file), str(images)]]))
    assert name in DatasetCatalog.list()


def test_an_image_that_breaks_during_training_is_named(tmp_path):
    """Files changed after registration (or datasets registered without the check)."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper

    from acm_d2.engine import SeededMapDataset

    _png_with_cut_image_data(tmp_path / "cut.png")
    item = {"file_name": str(tmp_path / "cut.png"), "image_id": 7, "height": 32, "width": 32, "annotations": []}
    dataset = SeededMapDataset([item], DatasetMapper(get_cfg(), is_train=True), seed=0, rank=0)
    with pytest.raises(OSError) as info:
        dataset[(0, 0)]
    assert f"while reading the training image {tmp_path / 'cut.png'} (image id 7)" in info.value.__notes__[0]
