"""What the ACM modules (and the other context modules) computed during one forward pass,
for whoever asked for it.

The orthogonality term of an ACM module, (K . Q) / C per sample, is computed inside the
module, but the loss it feeds is returned by the meta-architecture, several calls up. In
Detectron2, modules deep inside a model hand values upwards through a context opened by the
caller (``with EventStorage(): ...`` and ``get_event_storage().put_scalar(...)``); ACM does
the same:

    with ACMRecorder() as recorder:      # opened by the caller (the meta-architecture)
        outputs = model(batched_inputs)  # every ACM.forward calls report_acm_call(...)
    recorder.calls                       # [ACMCall(module, input, orthogonality), ...]

The peers (NL, CC, GC, CBAM) report their input too (with no orthogonality term), for the
attention pictures of :mod:`acm_d2.visualization`; the loss takes only ACM's calls.

Nothing is stored on any module: the calls live in the recorder, which lives as long as the
caller keeps it. Outside a ``with ACMRecorder()`` block, ``report_acm_call`` does nothing.
The open recorders are held in a :class:`contextvars.ContextVar`, so threads and asyncio
tasks each see their own.
"""
import contextvars
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

__all__ = ["ACMCall", "ACMRecorder", "report_acm_call"]


@dataclass
class ACMCall:
    """One call of an ACM module.

    Attributes:
        module: the ACM module that ran.
        input: X, (N, C, H, W), as the module received it (part of the autograd graph).
        orthogonality: (N,) per-sample (K . Q) / C with mean-subtracted K and Q, float32
            (float64 for float64 X), part of the autograd graph; None for the variants of
            the module without K or without Q.
    """

    module: nn.Module
    input: torch.Tensor
    orthogonality: Optional[torch.Tensor]


# The recorders open in this context, innermost last.
_OPEN: "contextvars.ContextVar[Tuple[ACMRecorder, ...]]" = contextvars.ContextVar("acm_recorders", default=())


class ACMRecorder:
    """Context manager that collects the :class:`ACMCall` of every ACM forward inside it.

    Recorders nest, and every open recorder gets every call: a test or a tool can record
    around a training forward whose meta-architecture records for its loss.
    """

    def __init__(self):
        self.calls: List[ACMCall] = []
        self._token = None

    def __enter__(self) -> "ACMRecorder":
        self._token = _OPEN.set(_OPEN.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _OPEN.reset(self._token)
        self._token = None


def report_acm_call(module: nn.Module, x: torch.Tensor, orthogonality: Optional[torch.Tensor]) -> None:
    """Hand one ACM call to the recorders open in the current context, if any."""
    recorders = _OPEN.get()
    if recorders:
        call = ACMCall(module, x, orthogonality)
        for recorder in recorders:
            recorder.calls.append(call)
