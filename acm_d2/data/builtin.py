"""Registers the built-in synthetic datasets under Detectron2 names at import of acm_d2.data.

Names (use them in a config like ``coco_2017_train``):

- ``acm_synthetic_train`` / ``acm_synthetic_val``: 96 px images, 600 / 150 images; the
  data set of ``make demo``.
- ``acm_synthetic_wide_train`` / ``acm_synthetic_wide_val``: 192 x 64 px strips, 600 / 150
  images: lesions at one end, the tube at the other, at least 96 px away; the default data
  set of ``tools/compare_backbones.py``.
- ``acm_synthetic_tiny_train`` / ``acm_synthetic_tiny_val``: 64 px, 16 / 8 images, for tests.

Registration uses Detectron2's ``register_coco_instances`` and points at the cache paths
(``$ACM_D2_DATA_CACHE``, default ``<checkout>/.cache/acm_synthetic``); the files are written
when the dataset is first loaded through ``DatasetCatalog.get``. The COCO evaluator reads
the JSON named in the metadata without loading the dataset first, so tools call
:func:`ensure_synthetic_dataset` before training or evaluating.
"""
import logging
from pathlib import Path
from typing import Dict, Iterable, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .synthetic import CATEGORIES, CONTEXT_CATEGORIES, LOCAL_CATEGORIES, SyntheticSpec, cached_dataset, default_cache_root

__all__ = ["SYNTHETIC_PRESETS", "register_synthetic_datasets", "ensure_synthetic_dataset", "synthetic_spec"]

logger = logging.getLogger(__name__)

#: Preset name -> parameters. Each preset registers ``<preset>_train`` and ``<preset>_val``.
SYNTHETIC_PRESETS: Dict[str, SyntheticSpec] = {
    "acm_synthetic": SyntheticSpec(image_size=96, num_train=600, num_val=150, seed=0),
    "acm_synthetic_wide": SyntheticSpec(image_size=64, width=192, num_train=600, num_val=150, seed=0),
    "acm_synthetic_tiny": SyntheticSpec(image_size=64, num_train=16, num_val=8, seed=1),
}

# dataset name -> cache root it is registered with
_REGISTERED_ROOT: Dict[str, Path] = {}


def _split_names(preset: str):
    return {f"{preset}_train": "train", f"{preset}_val": "val"}


def _preset_of(name: str) -> str:
    for preset in SYNTHETIC_PRESETS:
        if name in _split_names(preset) or name == preset:
            return preset
    raise KeyError(
        f"'{name}' is not a built-in synthetic dataset; known: "
        + ", ".join(n for p in SYNTHETIC_PRESETS for n in _split_names(p))
    )


def synthetic_spec(name: str) -> SyntheticSpec:
    """The :class:`SyntheticSpec` behind a dataset or preset name."""
    return SYNTHETIC_PRESETS[_preset_of(name)]


def _paths(spec: SyntheticSpec, root: Path, split: str):
    folder = root / spec.key()
    return folder / f"{split}.json", folder / split


def _register_one(name: str, spec: SyntheticSpec, split: str, root: Path) -> None:
    json_file, image_root = _paths(spec, root, split)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    metadata = {
        "thing_classes": [n for _, n in CATEGORIES],
        "context_classes": list(CONTEXT_CATEGORIES),
        "local_classes": list(LOCAL_CATEGORIES),
        "synthetic_spec": repr(spec),
    }
    register_coco_instances(name, metadata, str(json_file), str(image_root))

    def load():
        cached_dataset(spec, root)  # writes the files on first use, rebuilds a broken cache
        return load_coco_json(str(json_file), str(image_root), name)

    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    _REGISTERED_ROOT[name] = root


def register_synthetic_datasets(cache_root: Optional[Path] = None, presets: Optional[Iterable[str]] = None) -> None:
    """(Re-)register the synthetic datasets with the cache under ``cache_root``.

    ``cache_root`` defaults to :func:`default_cache_root` (read now, so a changed
    ``$ACM_D2_DATA_CACHE`` is honoured). Registering again with another root replaces the
    earlier registration.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    for preset in presets or SYNTHETIC_PRESETS:
        spec = SYNTHETIC_PRESETS[preset]
        for name, split in _split_names(preset).items():
            if _REGISTERED_ROOT.get(name) == root and name in DatasetCatalog.list():
                continue
            _register_one(name, spec, split, root)


def ensure_synthetic_dataset(names, cache_root: Optional[Path] = None) -> Dict[str, Path]:
    """Write the cache of the named synthetic datasets if needed, before training or eval.

    ``names``: one dataset/preset name or a list of them; names that are not built-in
    synthetic datasets are ignored, so a tool can pass ``cfg.DATASETS.TRAIN + TEST``. If
    ``$ACM_D2_DATA_CACHE`` changed since the registration, the datasets are re-registered
    so the metadata's ``json_file`` points at the files written. Returns the paths of the
    last dataset written (see :func:`acm_d2.data.synthetic.cached_dataset`), or ``{}``.
    """
    if isinstance(names, str):
        names = [names]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    paths: Dict[str, Path] = {}
    for name in names:
        try:
            preset = _preset_of(name)
        except KeyError:
            continue
        register_synthetic_datasets(root, [preset])
        paths = cached_dataset(SYNTHETIC_PRESETS[preset], root)
    return paths


register_synthetic_datasets()
