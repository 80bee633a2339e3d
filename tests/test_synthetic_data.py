"""The synthetic context dataset: determinism, COCO validity, the labelling rule, the cache."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from acm_d2.data import SYNTHETIC_PRESETS, ensure_synthetic_dataset
from acm_d2.data.synthetic import (
    CATEGORIES,
    SyntheticSpec,
    cached_dataset,
    generate_image,
    lesion_label_rule_holds,
    write_dataset,
)

SPEC = SyntheticSpec(image_size=64, num_train=12, num_val=6, seed=3)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ACM_D2_DATA_CACHE", str(root))
    return root


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_generator_is_deterministic_for_a_seed():
    a = generate_image(np.random.default_rng(7), 96)
    b = generate_image(np.random.default_rng(7), 96)
    c = generate_image(np.random.default_rng(8), 96)
    wide = generate_image(np.random.default_rng(7), 64, 0.5, 192)
    assert wide[0].shape == (64, 192, 3)
    assert np.array_equal(wide[0], generate_image(np.random.default_rng(7), 64, 0.5, 192)[0])
    assert np.array_equal(a[0], b[0])
    assert [o["category"] for o in a[1]] == [o["category"] for o in b[1]]
    assert a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_written_files_are_identical_for_a_seed(tmp_path):
    write_dataset(tmp_path / "a", SPEC)
    write_dataset(tmp_path / "b", SPEC)
    assert _read(tmp_path / "a" / "manifest.json")["files"] == _read(tmp_path / "b" / "manifest.json")["files"]
    other = SyntheticSpec(image_size=64, num_train=12, num_val=6, seed=4)
    write_dataset(tmp_path / "c", other)
    assert _read(tmp_path / "a" / "train.json")["annotations"] != _read(tmp_path / "c" / "train.json")["annotations"]


WIDE = SyntheticSpec(image_size=48, width=144, num_train=10, num_val=4, seed=5)


@pytest.mark.parametrize("spec", [SPEC, WIDE], ids=["square", "wide"])
def test_valid_coco_with_masks_inside_boxes_and_right_areas(cache, spec):
    paths = cached_dataset(spec)
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        coco = COCO(str(paths[f"{split}_json"]))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == [cid for cid, _ in CATEGORIES]
        assert (paths[f"{split}_images"]).is_dir()
        ann_ids = coco.getAnnIds()
        assert len(ann_ids) >= 2 * count  # at least one lesion and one control per image
        for ann in coco.loadAnns(ann_ids):
            img = coco.loadImgs(ann["image_id"])[0]
            assert (paths[f"{split}_images"] / img["file_name"]).is_file()
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
            m = coco.annToMask(ann)
            assert (img["height"], img["width"]) == (spec.height, spec.image_width)
            assert m.shape == (img["height"], img["width"])
            assert int(m.sum()) == pytest.approx(ann["area"], abs=0.5)
            ys, xs = np.nonzero(m)
            x, y, w, h = ann["bbox"]
            assert w > 2 and h > 2
            assert xs.min() >= x - 0.5 and xs.max() <= x + w + 0.5
            assert ys.min() >= y - 0.5 and ys.max() <= y + h + 0.5
            rle = mask_utils.encode(np.asfortranarray(m))
            assert list(mask_utils.toBbox(rle)) == pytest.approx([x, y, w, h], abs=1.0)


@pytest.mark.parametrize("width", [None, 240], ids=["square", "wide"])
def test_category_rule_holds_on_every_image(cache, width):
    spec = SyntheticSpec(image_size=96 if width is None else 80, num_train=60, num_val=10, seed=11, width=width)
    paths = cached_dataset(spec)
    coco = _read(paths["train_json"])
    assert lesion_label_rule_holds(coco) == []
    names = {c["id"]: c["name"] for c in coco["categories"]}
    seen = {names[a["category_id"]] for a in coco["annotations"]}
    assert seen == {n for _, n in CATEGORIES}
    # Recompute the rule here, independently: lesions are treated iff the image has a tube,
    # and the tube is at least half the image away from every lesion's box centre.
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in coco["images"]:
        tube = coco["tubes"][str(img["id"])]
        lesions = [a for a in by_image[img["id"]] if names[a["category_id"]].startswith("lesion")]
        assert 1 <= len(lesions) <= 2
        for a in lesions:
            assert names[a["category_id"]] == ("lesion_treated" if tube else "lesion_emergency")
            if tube:
                x, y, w, h = a["bbox"]
                c = np.array([x + w / 2, y + h / 2])
                p0, p1 = np.array(tube[:2]), np.array(tube[2:])
                ts = np.linspace(0, 1, 200)[:, None]
                dist = np.linalg.norm(p0 + ts * (p1 - p0) - c, axis=1).min()
                assert dist >= spec.image_width / 2 - 2
            # the lesions sit in the outer 30% strip of one side
            x, y, w, h = a["bbox"]
            cx = x + w / 2
            assert min(cx, spec.image_width - 1 - cx) <= 0.30 * spec.image_width + 1


def test_cache_is_reused(cache):
    paths = cached_dataset(SPEC)
    stamp = paths["train_json"].stat().st_mtime_ns
    again = cached_dataset(SPEC)
    assert again == paths
    assert again["train_json"].stat().st_mtime_ns == stamp
    assert paths["folder"].parent == cache


@pytest.mark.parametrize("damage", ["delete_image", "truncate_json", "delete_manifest"])
def test_broken_cache_is_rebuilt(cache, damage):
    paths = cached_dataset(SPEC)
    original = paths["train_json"].read_bytes()
    if damage == "delete_image":
        next(paths["val_images"].glob("*.png")).unlink()
    elif damage == "truncate_json":
        paths["train_json"].write_bytes(original[: len(original) // 2])
    else:
        (paths["folder"] / "manifest.json").unlink()
    cached_dataset(SPEC)
    assert paths["train_json"].read_bytes() == original
    assert len(list(paths["val_images"].glob("*.png"))) == SPEC.num_val
    COCO(str(paths["train_json"]))
    # no temporary folders are left behind
    assert [p.name for p in cache.iterdir()] == [paths["folder"].name]


def test_registered_names_load_through_detectron2(cache):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    paths = ensure_synthetic_dataset(["acm_synthetic_tiny_train", "coco_2017_train"])
    assert str(paths["folder"]).startswith(str(cache))
    meta = MetadataCatalog.get("acm_synthetic_tiny_val")
    assert meta.json_file == str(paths["val_json"])
    assert meta.evaluator_type == "coco"
    dicts = DatasetCatalog.get("acm_synthetic_tiny_train")
    assert len(dicts) == SYNTHETIC_PRESETS["acm_synthetic_tiny"].num_train
    assert meta.thing_classes == [n for _, n in CATEGORIES]


def test_first_load_writes_the_cache(cache):
    from detectron2.data import DatasetCatalog

    from acm_d2.data import register_synthetic_datasets

    register_synthetic_datasets()  # picks up the monkeypatched $ACM_D2_DATA_CACHE
    assert not cache.exists()
    dicts = DatasetCatalog.get("acm_synthetic_tiny_val")
    assert len(dicts) == SYNTHETIC_PRESETS["acm_synthetic_tiny"].num_val
    assert all(p.parent.parent.parent == cache for p in map(lambda d: __import__("pathlib").Path(d["file_name"]), dicts))
