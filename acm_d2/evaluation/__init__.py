"""COCO evaluation with a fast evaluator: faster-coco-eval through Detectron2's COCOEvaluator.

Detectron2's :class:`~detectron2.evaluation.COCOEvaluator` computes AP with its compiled
``COCOeval_opt`` when ``use_fast_impl`` is True and falls back to pycocotools when
Detectron2 was installed without its extension ("Fast COCO eval is not built"). The
``faster-coco-eval`` package carries that same C++ evaluator (a maintained descendant of
Detectron2's), as ``COCOeval_faster`` with pycocotools' interface: :func:`fast_coco_eval_impl`
puts it where Detectron2 looks for ``COCOeval_opt`` when Detectron2's own is missing, so
``COCOEvaluator(..., use_fast_impl=True)`` runs it. It reads Detectron2's pycocotools ``COCO``
objects and gives the same numbers as pycocotools (tests/test_coco_eval.py).

Config: ``TEST.COCO_EVAL_IMPL`` (:func:`add_evaluation_config`): "auto" (default: the fast
evaluator when one is available, else pycocotools) or "pycocotools" (always the official
pycocotools code). :func:`build_coco_evaluator` builds the evaluator accordingly.
"""
import logging
from typing import Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation

__all__ = ["COCO_EVAL_IMPLS", "add_evaluation_config", "build_coco_evaluator", "fast_coco_eval_impl"]

logger = logging.getLogger(__name__)

#: Allowed values of TEST.COCO_EVAL_IMPL.
COCO_EVAL_IMPLS = ("auto", "pycocotools")
INSTALL_HINT = "pip install faster-coco-eval (make setup installs it)"


def add_evaluation_config(cfg) -> None:
    """Add ``TEST.COCO_EVAL_IMPL`` ("auto": the fast evaluator when available; "pycocotools")."""
    cfg.TEST.COCO_EVAL_IMPL = "auto"


def fast_coco_eval_impl() -> Optional[str]:
    """Make ``COCOEvaluator(use_fast_impl=True)`` fast if it can be; return what it runs.

    Returns:
        "detectron2" when Detectron2's compiled evaluator is built, else "faster_coco_eval"
        when that package is installed (it is then set as Detectron2's ``COCOeval_opt``),
        else None (COCOEvaluator falls back to pycocotools).
    """
    current = coco_evaluation.COCOeval_opt
    if current is not coco_evaluation.COCOeval:
        return "faster_coco_eval" if current.__module__.startswith("faster_coco_eval") else "detectron2"
    try:
        from faster_coco_eval.core.faster_eval_api import COCOeval_faster
    except ImportError:
        return None
    coco_evaluation.COCOeval_opt = COCOeval_faster
    return "faster_coco_eval"


def build_coco_evaluator(cfg, dataset_name: str, output_dir: Optional[str] = None, **kwargs) -> COCOEvaluator:
    """Detectron2's ``COCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)`` with
    ``use_fast_impl`` from ``cfg.TEST.COCO_EVAL_IMPL`` (see the module docstring).

    Raises:
        ValueError: TEST.COCO_EVAL_IMPL is not one of :data:`COCO_EVAL_IMPLS`.
    """
    choice = cfg.TEST.get("COCO_EVAL_IMPL", "auto")
    if choice not in COCO_EVAL_IMPLS:
        raise ValueError(f"TEST.COCO_EVAL_IMPL must be one of {list(COCO_EVAL_IMPLS)}, got {choice!r}")
    impl = fast_coco_eval_impl() if choice == "auto" else None
    if choice == "auto" and impl is None:
        logger.warning("No fast COCO evaluator (%s): evaluating with pycocotools, which is slower", INSTALL_HINT)
    logger.info("COCO evaluation of %s with %s (TEST.COCO_EVAL_IMPL %s)", dataset_name, impl or "pycocotools", choice)
    return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=impl is not None, **kwargs)
