"""Data for acm-d2: the built-in synthetic context datasets and checked COCO registration.

Importing this package registers the built-in synthetic datasets with Detectron2
(``acm_synthetic_train``, ``acm_synthetic_val``, ... see :mod:`acm_d2.data.builtin`).
"""
from . import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from .builtin import SYNTHETIC_PRESETS, ensure_synthetic_dataset, register_synthetic_datasets, synthetic_spec
from .coco_format import (
    CocoFormatError,
    check_num_classes,
    check_same_categories,
    register_coco_format_dataset,
    validate_coco_instances,
)
from .synthetic import CATEGORIES, CONTEXT_CATEGORIES, LOCAL_CATEGORIES, SyntheticSpec, cached_dataset

__all__ = [
    "SYNTHETIC_PRESETS",
    "ensure_synthetic_dataset",
    "register_synthetic_datasets",
    "synthetic_spec",
    "CocoFormatError",
    "check_num_classes",
    "check_same_categories",
    "register_coco_format_dataset",
    "validate_coco_instances",
    "CATEGORIES",
    "CONTEXT_CATEGORIES",
    "LOCAL_CATEGORIES",
    "SyntheticSpec",
    "cached_dataset",
]
