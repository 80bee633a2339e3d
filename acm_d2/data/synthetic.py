"""A small synthetic instance-segmentation dataset whose labels need long-range context.

It is built after the paper's emergency-pneumothorax task (Kim et al., ECCV 2020, arXiv
2007.07506, Sec. 4.1): a pneumothorax is an emergency unless a chest tube, inserted as its
treatment, is visible elsewhere in the image. Here every image holds

- one or two *lesions* (filled ellipses, random colour) on one side of the image; a lesion
  is ``lesion_emergency`` when the image has no tube and ``lesion_treated`` when a tube is
  visible. Both look exactly alike; the tube is always on the other side of the image, at
  least half the image width away from every lesion centre, so a local window around a
  lesion cannot tell its category: only a comparison with far-away context can;
- possibly a *tube*: a thick white line segment, not annotated (like the tubes of the
  paper's data), drawn only as context;
- one or two *control* shapes whose category is local: ``square`` (a rotated square) or
  ``triangle``, with colours from the same palette as the lesions.

Lesion positions, sizes and colours are drawn from the same distribution whether or not the
image has a tube, so nothing but the tube tells the two lesion categories apart.

The writer produces real COCO files: PNG images and an instances JSON (polygon masks,
XYWH boxes, areas, ``iscrowd`` 0) per split, written into a temporary folder and renamed
into place, with a manifest holding the parameters and a SHA-256 of every file. A cache
whose manifest is missing, of another version or parameters, or whose files do not match
their hashes, is rebuilt, never half-used.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .file_lock import exclusive_lock

__all__ = [
    "CATEGORIES",
    "CONTEXT_CATEGORIES",
    "LOCAL_CATEGORIES",
    "SyntheticSpec",
    "default_cache_root",
    "generate_image",
    "write_dataset",
    "cached_dataset",
    "verify_cache",
    "lesion_label_rule_holds",
]

logger = logging.getLogger(__name__)

#: Bump when the drawing or the file layout changes: old caches are then rebuilt.
GENERATOR_VERSION = 1

#: COCO categories (id, name). Ids start at 1 as in COCO.
CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "lesion_emergency"),
    (2, "lesion_treated"),
    (3, "square"),
    (4, "triangle"),
)
#: Categories decided only by far-away context (the tube), and those decided locally.
CONTEXT_CATEGORIES = ("lesion_emergency", "lesion_treated")
LOCAL_CATEGORIES = ("square", "triangle")

_CAT_ID = {name: cid for cid, name in CATEGORIES}

# Strong, distinct colours (RGB) shared by lesions and control shapes; the tube is white.
_PALETTE = (
    (230, 40, 40),
    (40, 200, 60),
    (60, 90, 240),
    (240, 220, 40),
    (220, 60, 220),
    (40, 210, 220),
    (250, 140, 30),
)
_TUBE_COLOUR = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of one synthetic dataset (both splits).

    Attributes:
        image_size: side of the square images (their height if ``width`` is set), in pixels.
        num_train: number of training images.
        num_val: number of validation images.
        seed: seed of the generator; the val split uses ``seed + 1_000_003``.
        tube_probability: probability that an image holds a tube (lesions then "treated").
        width: image width for wide strips (lesions at one end, the tube at the other, at
            least ``width / 2`` apart); None (default) for square images.
    """

    image_size: int = 128
    num_train: int = 600
    num_val: int = 150
    seed: int = 0
    tube_probability: float = 0.5
    width: Optional[int] = None

    @property
    def height(self) -> int:
        return self.image_size

    @property
    def image_width(self) -> int:
        return self.width or self.image_size

    def as_dict(self) -> Dict:
        """The parameters (``width`` only when set, so square specs keep their old hash)."""
        d = dataclasses.asdict(self)
        if d["width"] is None:
            del d["width"]
        return d

    def key(self) -> str:
        """A short name for the cache folder: version and a hash of the parameters."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        size = f"{self.image_size}px" if self.width is None else f"{self.width}x{self.image_size}px"
        return f"v{GENERATOR_VERSION}-{size}-{self.num_train}-{self.num_val}-s{self.seed}-{digest}"


def default_cache_root() -> Path:
    """``$ACM_D2_DATA_CACHE`` if set, else ``<checkout>/.cache/acm_synthetic`` in a checkout
    (editable install), else ``~/.cache/acm_d2/synthetic`` (an installed package)."""
    env = os.environ.get("ACM_D2_DATA_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "setup.py").is_file():  # installed: not next to site-packages
        return Path("~/.cache/acm_d2/synthetic").expanduser()
    return checkout / ".cache" / "acm_synthetic"


# ----------------------------------------------------------------------------------------
# Drawing one image
# ----------------------------------------------------------------------------------------
def _ellipse_polygon(cx, cy, ax, ay, angle_deg) -> np.ndarray:
    pts = cv2.ellipse2Poly(
        (int(round(cx)), int(round(cy))), (int(round(ax)), int(round(ay))), int(angle_deg), 0, 360, 10
    )
    return pts.astype(np.float64)


def _regular_polygon(cx, cy, radius, sides, angle) -> np.ndarray:
    t = angle + np.arange(sides) * 2 * math.pi / sides
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _boxes_overlap(b1, b2, margin) -> bool:
    return not (
        b1[2] + margin <= b2[0] or b2[2] + margin <= b1[0] or b1[3] + margin <= b2[1] or b2[3] + margin <= b1[1]
    )


def _poly_box(poly: np.ndarray):
    return (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())


def _place(poly, category, centre, objects, occupied, width, height, margin) -> bool:
    """Add the object if its box lies inside the image and clear of ``occupied``; say if it did."""
    box = _poly_box(poly)
    if box[0] < 1 or box[1] < 1 or box[2] > width - 2 or box[3] > height - 2:
        return False
    if any(_boxes_overlap(box, b, margin) for b in occupied):
        return False
    occupied.append(box)
    objects.append({"category": category, "polygon": poly, "centre": centre})
    return True


def generate_image(rng: np.random.Generator, size: int, tube_probability: float = 0.5, width: Optional[int] = None):
    """Draw one image of height ``size`` and width ``width`` (default ``size``).

    Returns ``(image, objects, tube)``: image is an (size, width, 3) uint8 RGB array; objects
    is a list of dicts ``{"category": name, "polygon": (P, 2) float array, "centre": (x, y)}``;
    tube is ``None`` or ``(x0, y0, x1, y1)``, the end points of the tube segment.
    """
    width = width or size
    sx, sy = float(width), float(size)  # positions scale with the image's width / height
    s = math.sqrt(sx * sy)  # object sizes scale with the geometric mean (= the side if square)
    # Background: a dark, noisy vertical gradient (a loose nod to a radiograph).
    base = rng.uniform(25, 60)
    grad = np.linspace(0, rng.uniform(-15, 15), size)[:, None]
    bg = base + grad + rng.normal(0, 6, (size, width))
    image = np.repeat(np.clip(bg, 0, 255)[:, :, None], 3, axis=2).astype(np.uint8)

    lesion_side = int(rng.integers(2))  # 0: lesions on the left, 1: on the right
    has_tube = bool(rng.random() < tube_probability)
    occupied: List[Tuple[float, float, float, float]] = []
    objects: List[Dict] = []
    margin = 0.03 * s

    def mirror(x):
        return x if lesion_side == 0 else sx - 1 - x

    # Lesions: centres in the outer 30% strip of their side, same law with or without tube.
    num_lesions = int(rng.integers(1, 3))
    lesion_name = "lesion_treated" if has_tube else "lesion_emergency"
    for _ in range(num_lesions):
        for _attempt in range(50):
            ax, ay = rng.uniform(0.06, 0.10, size=2) * s
            cx = mirror(rng.uniform(0.12 * sx, 0.30 * sx))
            cy = rng.uniform(0.14 * sy, 0.86 * sy)
            poly = _ellipse_polygon(cx, cy, ax, ay, rng.uniform(0, 180))
            if _place(poly, lesion_name, (cx, cy), objects, occupied, sx, sy, margin):
                break

    # Tube: on the far side, at least half the image away from every lesion centre.
    tube = None
    if has_tube:
        for _attempt in range(100):
            x0 = mirror(rng.uniform(0.82 * sx, 0.93 * sx))
            y0 = rng.uniform(0.08 * sy, 0.45 * sy)
            length = rng.uniform(0.35, 0.55) * sy
            angle = rng.uniform(math.radians(70), math.radians(110))
            x1 = x0 + length * math.cos(angle) * (1 if lesion_side == 0 else -1) * 0.3
            y1 = min(y0 + length * math.sin(angle), 0.94 * sy)
            a, b = np.array([x0, y0]), np.array([x1, y1])
            if all(_segment_distance(np.array(o["centre"]), a, b) >= 0.5 * sx for o in objects):
                tube = (x0, y0, x1, y1)
                break
        if tube is None:  # cannot happen with the ranges above; keep the rule exact anyway
            raise RuntimeError("could not place a tube far enough from the lesions")
        thickness = max(2, int(round(0.035 * s)))
        cv2.line(
            image,
            (int(round(tube[0])), int(round(tube[1]))),
            (int(round(tube[2])), int(round(tube[3]))),
            _TUBE_COLOUR,
            thickness,
            lineType=cv2.LINE_AA,
        )
        half = thickness / 2 + 1
        occupied.append(
            (min(tube[0], tube[2]) - half, min(tube[1], tube[3]) - half,
             max(tube[0], tube[2]) + half, max(tube[1], tube[3]) + half)
        )

    # Control shapes anywhere free; their category is their shape.
    num_controls = int(rng.integers(1, 3))
    for _ in range(num_controls):
        name = "square" if rng.random() < 0.5 else "triangle"
        for _attempt in range(100):
            radius = rng.uniform(0.08, 0.12) * s
            cx, cy = rng.uniform(np.array([0.1 * sx, 0.1 * sy]), np.array([0.9 * sx, 0.9 * sy]))
            sides = 4 if name == "square" else 3
            poly = _regular_polygon(cx, cy, radius, sides, rng.uniform(0, 2 * math.pi))
            if _place(poly, name, (cx, cy), objects, occupied, sx, sy, margin):
                break

    for obj in objects:
        colour = _PALETTE[int(rng.integers(len(_PALETTE)))]
        pts = np.round(obj["polygon"]).astype(np.int32)
        cv2.fillPoly(image, [pts], colour, lineType=cv2.LINE_8)
    return image, objects, tube


def _annotation(obj: Dict, image_id: int, ann_id: int, height: int, width: int) -> Dict:
    poly = np.round(obj["polygon"]).astype(np.float64)  # the drawn polygon, in pixels
    flat = [float(v) for v in poly.reshape(-1)]
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": _CAT_ID[obj["category"]],
        "segmentation": [flat],
        "bbox": [x, y, w, h],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def _write_split(folder: Path, split: str, spec: SyntheticSpec, seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    image_dir = folder / split
    image_dir.mkdir(parents=True)
    images, annotations, tubes = [], [], {}
    ann_id = 1
    for i in range(count):
        image_id = i + 1
        image, objects, tube = generate_image(rng, spec.image_size, spec.tube_probability, spec.width)
        file_name = f"{split}_{image_id:05d}.png"
        cv2.imwrite(str(image_dir / file_name), image[:, :, ::-1])  # RGB -> BGR for OpenCV
        images.append(
            {"id": image_id, "file_name": file_name, "height": spec.height, "width": spec.image_width}
        )
        tubes[image_id] = None if tube is None else [float(v) for v in tube]
        for obj in objects:
            annotations.append(_annotation(obj, image_id, ann_id, spec.height, spec.image_width))
            ann_id += 1
    coco = {
        "info": {
            "description": "acm-d2 synthetic context dataset (lesion/tube after the Em-Ptx task)",
            "version": str(GENERATOR_VERSION),
            "spec": spec.as_dict(),
            "split": split,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "context" if name in CONTEXT_CATEGORIES else "local"}
            for cid, name in CATEGORIES
        ],
        # Not part of COCO: the (unannotated) tube of each image, for tests and pictures.
        "tubes": {str(k): v for k, v in tubes.items()},
    }
    with open(folder / f"{split}.json", "w") as f:
        json.dump(coco, f)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_dataset(folder: Path, spec: SyntheticSpec) -> None:
    """Write both splits and ``manifest.json`` into ``folder`` (which must not exist)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    _write_split(folder, "train", spec, spec.seed, spec.num_train)
    _write_split(folder, "val", spec, spec.seed + 1_000_003, spec.num_val)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {
        "version": GENERATOR_VERSION,
        "spec": spec.as_dict(),
        "files": {str(p.relative_to(folder)): _sha256(p) for p in files},
    }
    with open(folder / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)


def verify_cache(folder: Path, spec: SyntheticSpec) -> Optional[str]:
    """Return ``None`` if ``folder`` holds a complete dataset for ``spec``, else the reason."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return f"no manifest at {manifest_path}"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest {manifest_path}: {e}"
    if manifest.get("version") != GENERATOR_VERSION:
        return f"generator version {manifest.get('version')} != {GENERATOR_VERSION}"
    if manifest.get("spec") != spec.as_dict():
        return f"parameters {manifest.get('spec')} != {spec.as_dict()}"
    expected = manifest.get("files") or {}
    if not expected:
        return "manifest lists no files"
    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            return f"missing file {path}"
        if _sha256(path) != digest:
            return f"file {path} does not match its hash in the manifest"
    return None


def cached_dataset(spec: SyntheticSpec, cache_root: Optional[Path] = None) -> Dict[str, Path]:
    """Make sure the dataset of ``spec`` is complete in the cache; write it if not.

    Returns a dict with ``folder``, ``train_json``, ``train_images``, ``val_json`` and
    ``val_images`` paths. The files are written into a temporary folder next to the cache
    and renamed into place, so a crash never leaves a half-written dataset under the final
    name; a final folder that fails :func:`verify_cache` is rebuilt and replaced. Processes
    that share the cache take a file lock: one checks and builds, the others wait for it.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / spec.key()
    root.mkdir(parents=True, exist_ok=True)
    # One process (of the ranks, or of runs sharing the cache) checks and builds; the others
    # wait and then find it complete.
    # (the lock file is next to the cache folder, which holds only datasets)
    with exclusive_lock(root.parent / f".{root.name}.lock", f"the synthetic dataset cache {folder}"):
        problem = verify_cache(folder, spec) if folder.exists() else "not written yet"
        if problem is not None:
            if folder.exists():
                logger.warning("Rebuilding the synthetic dataset cache %s: %s", folder, problem)
            logger.info("Writing the synthetic dataset %s into %s", spec, folder)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.key()}-", dir=root))
            try:
                write_dataset(tmp / "data", spec)
                if folder.exists():  # the old folder out and the new one in: one rename each
                    os.rename(folder, tmp / "old")
                os.rename(tmp / "data", folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return {
        "folder": folder,
        "train_json": folder / "train.json",
        "train_images": folder / "train",
        "val_json": folder / "val.json",
        "val_images": folder / "val",
    }


def lesion_label_rule_holds(coco: Dict, image_size: Optional[int] = None) -> List[str]:
    """Check the labelling rule on a loaded instances JSON; return the violations found.

    Recomputes, from the annotations and the recorded tubes, that every lesion is
    ``lesion_treated`` exactly when its image has a tube, that the tube is at least half the
    image width away from every lesion centre (``image_size`` overrides the width read from
    each image entry).
    """
    names = {c["id"]: c["name"] for c in coco["categories"]}
    problems = []
    by_image: Dict[int, List[Dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for img in coco["images"]:
        tube = coco["tubes"][str(img["id"])]
        for ann in by_image.get(img["id"], []):
            name = names[ann["category_id"]]
            if name not in CONTEXT_CATEGORIES:
                continue
            want = "lesion_treated" if tube is not None else "lesion_emergency"
            if name != want:
                problems.append(f"image {img['id']}: {name} but tube={tube}")
            x, y, w, h = ann["bbox"]
            centre = np.array([x + w / 2, y + h / 2])
            if tube is not None:
                d = _segment_distance(centre, np.array(tube[:2]), np.array(tube[2:]))
                # the box centre may differ from the drawn centre by rounding (< 2 px)
                if d < 0.5 * (image_size or img["width"]) - 2:
                    problems.append(f"image {img['id']}: tube only {d:.1f}px from a lesion")
    return problems
