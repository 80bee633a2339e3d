"""The ACM orthogonality loss ``loss_acm_orth``, from the calls an :class:`ACMRecorder` saw.

For one batch of N samples and the chosen modules m:

    loss_acm_orth = lambda * | mean over the N samples of sum over m of (K_m . Q_m) / C_m |

Which modules count is MODEL.ACM.ORTH_LOSS_MODULES:

* "all": every ACM module, as the paper's equation 6 writes it (a sum over all M modules);
* "res5": the modules of res5 only, which is what the authors' Detectron2 code computes,
  and so what the COCO models of the paper's Table 6 were trained with: each of their
  blocks adds its term to the running sum of its stage, each stage starts from zero, their
  FPN passes on only the sum of res5, and their ``rcnn.py`` adds
  ``lambda * |mean over the batch of that sum|``.

When the modules run several times in one forward (two backbone passes over two batches),
each pass gives per-sample sums and the mean runs over the samples of all passes.
"""
import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from .recorder import ACMCall

__all__ = ["LOSS_KEY", "ORTH_LOSS_MODULES", "acm_orth_loss", "check_orth_loss_weight", "stage_of_block"]

LOSS_KEY = "loss_acm_orth"
#: The choices of MODEL.ACM.ORTH_LOSS_MODULES (see the module docstring).
ORTH_LOSS_MODULES = ("all", "res5")


def check_orth_loss_weight(weight) -> float:
    """``weight`` as a float, or ValueError unless it is a finite number >= 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"MODEL.ACM.ORTH_LOSS_WEIGHT must be a finite number >= 0, got {weight!r}")
    return float(weight)


def stage_of_block(block_name: str) -> str:
    """"backbone.bottom_up.res5.2" -> "res5": the last part of the name that is a stage."""
    stages = [part for part in block_name.split(".") if part.startswith("res") and part[3:].isdigit()]
    return stages[-1] if stages else ""


def acm_orth_loss(calls: Sequence[ACMCall], block_names: Dict[nn.Module, str], weight: float, modules: str) -> torch.Tensor:
    """``loss_acm_orth`` of one training forward.

    Args:
        calls: what an :class:`ACMRecorder` collected during the forward.
        block_names: every ACM module of the model -> its block's name ("...res5.2").
        weight: lambda.
        modules: "all" or "res5" (see the module docstring).
    Returns a scalar tensor (float32; float64 for float64 features), part of the graph.
    """
    chosen = [c for c in calls if c.module in block_names and (modules == "all" or stage_of_block(block_names[c.module]) == modules)]
    if not chosen:
        raise RuntimeError(
            f"loss_acm_orth (MODEL.ACM.ORTH_LOSS_MODULES {modules!r}): no ACM module of the model ran in this "
            f"training forward; does the meta-architecture run its backbone?"
        )
    missing = [block_names[c.module] for c in chosen if c.orthogonality is None]
    if missing:
        raise ValueError(
            f"loss_acm_orth needs K and Q, but the ACM modules {missing[:3]} have none (their MODEL.ACM.VARIANT has no "
            f"K or no Q); set MODEL.ACM.ORTH_LOSS_WEIGHT 0 for that variant"
        )
    passes: List[List[torch.Tensor]] = []  # pass -> the terms (N_pass,) of its modules
    seen: Dict[nn.Module, int] = {}
    for call in chosen:
        index = seen.get(call.module, 0)
        seen[call.module] = index + 1
        if index == len(passes):
            passes.append([])
        passes[index].append(call.orthogonality)
    per_sample = []
    for index, terms in enumerate(passes):
        sizes = {t.shape[0] for t in terms}
        if len(sizes) > 1 or len(terms) != len(passes[0]):
            raise ValueError(
                f"loss_acm_orth: in backbone pass {index}, the ACM modules ran on batches of sizes {sorted(sizes)} "
                f"and {len(terms)} of {len(passes[0])} modules ran; the loss sums the modules' terms per sample, "
                f"which needs every module to run once per pass on the same samples"
            )
        per_sample.append(torch.stack(terms).sum(dim=0))  # (N_pass,)
    return weight * torch.cat(per_sample).mean().abs()
