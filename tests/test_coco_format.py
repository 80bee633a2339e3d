"""register_coco_format_dataset: checks before training, clear messages, idempotence."""
import json
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from acm_d2.data import CocoFormatError, register_coco_format_dataset


def _name():
    return f"test_coco_{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def dataset(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
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


def test_registers_and_loads(dataset):
    path, images, _ = dataset
    name = _name()
    assert register_coco_format_dataset(name, path, images) == name
    assert MetadataCatalog.get(name).json_file == str(path.resolve())
    assert MetadataCatalog.get(name).evaluator_type == "coco"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 1 and len(dicts[0]["annotations"]) == 1
    # idempotent for the same triple, also spelled differently
    assert register_coco_format_dataset(name, str(path), str(images) + "/") == name


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


def test_not_json(tmp_path, dataset):
    _, images, _ = dataset
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match=f"{bad} is not valid JSON"):
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


def test_annotation_with_unknown_image_id(tmp_path, dataset):
    _, images, data = dataset
    data["annotations"].append(dict(data["annotations"][0], id=2, image_id=42))
    data["annotations"].append(dict(data["annotations"][0], id=3, image_id=43))
    path = _write(tmp_path / "orphans.json", data)
    name = _name()
    with pytest.raises(CocoFormatError, match=f"{path}: annotations refer to image ids that are not in 'images': 42, 43"):
        register_coco_format_dataset(name, path, images)
    assert name not in DatasetCatalog.list()  # nothing registered on failure


def test_annotation_with_unknown_category(tmp_path, dataset):
    _, images, data = dataset
    data["annotations"][0]["category_id"] = 7
    path = _write(tmp_path / "cats.json", data)
    with pytest.raises(CocoFormatError, match="category ids that are not in 'categories': 7"):
        register_coco_format_dataset(_name(), path, images)


def test_missing_image_file(tmp_path, dataset):
    _, images, data = dataset
    data["images"].append({"id": 2, "file_name": "b.png", "height": 8, "width": 8})
    path = _write(tmp_path / "noimg.json", data)
    with pytest.raises(CocoFormatError, match=f"1 of 2 image files are missing under {images}: 'b.png'"):
        register_coco_format_dataset(_name(), path, images)
