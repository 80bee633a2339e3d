"""The first iterations' losses of one training on two devices, compared (the GPU check's demo part).

:func:`train_losses` trains a config for a few iterations in this process with
:class:`acm_d2.train_net.Trainer` (the trainer of ``tools/train_net.py``) and returns every loss
term of every iteration from the trainer's EventStorage; :func:`compare_losses` compares two
such curves. The curves of two devices can only agree where both runs draw the same random
numbers: the proposal and ROI sampling draw on the device (``torch.randperm`` on CUDA draws
other numbers than on the CPU), so :data:`SAMPLE_EVERYTHING` makes both samplers take every
labelled anchor and proposal, leaving nothing to draw; TF32 is off during the runs.
"""
import contextlib
import logging
import math
import statistics
import tempfile
from typing import Dict, List, Sequence

import torch

__all__ = ["SAMPLE_EVERYTHING", "compare_losses", "train_losses"]

logger = logging.getLogger(__name__)

#: Overrides under which the RPN and the ROI heads sample every labelled anchor / proposal
#: (half the batch may be positives: all of them; the rest negatives: all of them).
SAMPLE_EVERYTHING = [
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.RPN.POSITIVE_FRACTION", "0.5",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.5",
]


@contextlib.contextmanager
def _tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def train_losses(config_file: str, opts: Sequence[str], device: str, iterations: int) -> dict:
    """Train ``config_file`` (with ``opts``, then :data:`SAMPLE_EVERYTHING`) for ``iterations``
    iterations on ``device`` in this process, from the config's SEED, without evaluation, into a
    temporary OUTPUT_DIR. Returns {"losses": {term: [value per iteration]}, "seconds_per_iter":
    median of Detectron2's per-iteration "time" after the first}."""
    from detectron2.utils.env import seed_all_rng

    from ..config import get_acm_cfg
    from ..train_net import Trainer

    with tempfile.TemporaryDirectory(prefix="acm_d2_losses_") as output_dir, _tf32_off():
        cfg = get_acm_cfg(config_file, list(opts) + SAMPLE_EVERYTHING + [
            "MODEL.DEVICE", device, "SOLVER.MAX_ITER", str(iterations), "OUTPUT_DIR", output_dir,
            "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", str(10**6),
        ])
        cfg.freeze()
        seed_all_rng(cfg.SEED)  # as default_setup: the model's initialisation
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        storage = trainer.storage
        losses = {
            name: [float(value) for value, _ in storage.history(name).values()]
            for name in sorted(storage.histories()) if name == "total_loss" or name.startswith("loss_")
        }
        times = [value for value, _ in storage.history("time").values()][1:] if "time" in storage.histories() else []
    logger.info("trained %d iterations on %s", iterations, device)
    return {"losses": losses, "seconds_per_iter": statistics.median(times) if times else None}


def compare_losses(reference: Dict[str, List[float]], other: Dict[str, List[float]], tolerance: float) -> dict:
    """Per iteration, the largest relative difference over the loss terms of both curves
    (``|a - b| / max(|a|, 1e-8)``), and how many leading iterations agree within ``tolerance``."""
    if not reference or set(reference) != set(other):
        raise ValueError(f"the two runs logged different loss terms: {sorted(reference)} and {sorted(other)}")
    terms = sorted(reference)
    count = min(len(curve[t]) for curve in (reference, other) for t in terms)
    per_iteration = []
    for i in range(count):
        diffs = [abs(other[t][i] - reference[t][i]) / max(abs(reference[t][i]), 1e-8) for t in terms]
        per_iteration.append(math.inf if any(math.isnan(d) for d in diffs) else max(diffs))
    matching = next((i for i, d in enumerate(per_iteration) if not d <= tolerance), len(per_iteration))
    return {"tolerance": tolerance, "terms": terms, "max_relative_difference": per_iteration,
            "matching_iterations": matching, "iterations": count}
