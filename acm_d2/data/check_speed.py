"""How long registration's image check takes: ``python -m acm_d2.data.check_speed --images 5000``.

Writes ``--images`` COCO-sized JPEGs (640 x 480, quality 90) with one box each into a
temporary folder, then times :func:`acm_d2.data.validate_coco_instances` twice: first with an
empty image-check cache (every image decoded in full), then again (every result from the
cache, keyed by path, size and mtime). Prints one line per run (docs/safety.md quotes them).
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .coco_format import validate_coco_instances

__all__ = ["measure"]


def _write_images(root: Path, count: int, width: int = 640, height: int = 480) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    images, annotations = [], []
    for i in range(count):
        pixels = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), dtype=np.uint8))  # photo-like blocks
        Image.fromarray(pixels).save(root / f"{i:06d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": width, "height": height})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 20, 100, 80], "area": 8000, "iscrowd": 0})
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return json_file


def measure(count: int) -> dict:
    """Seconds to validate ``count`` JPEGs with an empty cache and with a full one."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        json_file = _write_images(root, count)
        os.environ["ACM_D2_CHECK_CACHE"] = str(Path(tmp) / "cache")
        times = {}
        for run in ("first (every image decoded)", "second (from the cache)"):
            start = time.perf_counter()
            validate_coco_instances(json_file, root)
            times[run] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    for run, seconds in measure(args.images).items():
        print(f"{args.images} JPEGs 640x480, {os.cpu_count()} CPUs, {run}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
