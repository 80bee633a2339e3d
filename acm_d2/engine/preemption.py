"""Stop training on a signal at an iteration boundary, with a checkpoint that ``--resume`` continues.

Cluster schedulers announce a preemption or the end of the time limit with a signal
(SLURM jobs submitted with submitit get ``SIGUSR2``, ``signal_delay_s`` before the kill).
A checkpoint written inside the signal handler would catch the trainer mid-iteration. Instead:

1. :func:`request_stop_on` installs a handler that only records the signal;
2. :class:`CheckpointOnStop` (one of :class:`~acm_d2.engine.ResumableTrainer`'s hooks) checks
   after every iteration whether any process recorded one (one all-reduce of a flag, only
   while a handler is installed), so that all processes stop after the same iteration;
3. rank 0 saves ``model_{iter:07d}.pth`` exactly as Detectron2's PeriodicCheckpointer would
   at that iteration, all processes wait for it, and :class:`TrainingInterrupted` is raised
   in every process. ``--resume`` continues at the next iteration; on the CPU the resumed run
   ends with the weights of an uninterrupted one (the data stream and seeds resume too).

Without an installed handler the hook does nothing.
"""
import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["CheckpointOnStop", "TrainingInterrupted", "request_stop_on", "stop_requested", "clear_stop_request"]

logger = logging.getLogger(__name__)

_state = {"installed": False, "signum": None}


class TrainingInterrupted(BaseException):
    """Training stopped on a signal after ``iteration`` with a checkpoint at ``path``.

    A BaseException (like KeyboardInterrupt): not an error of the training, so the trainer's
    ``except Exception`` does not log it as one; its ``after_train`` hooks still run.
    """

    def __init__(self, iteration: int, path: str, signum: Optional[int]):
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"Training stopped on {name} after iteration {iteration}; checkpoint {path}")
        self.iteration = iteration
        self.path = path
        self.signum = signum


def _record(signum, frame):
    if _state["signum"] is None:
        logger.warning("Received %s: stopping with a checkpoint after this iteration", signal.Signals(signum).name)
    _state["signum"] = signum


def request_stop_on(*signums: int) -> None:
    """From now on, each of ``signums`` (e.g. ``signal.SIGUSR2``) stops training after the
    current iteration with a checkpoint (call from the main thread)."""
    for signum in signums:
        signal.signal(signum, _record)
    _state["installed"] = True


def stop_requested() -> Optional[int]:
    """The signal this process received since :func:`request_stop_on`, or None."""
    return _state["signum"]


def clear_stop_request() -> None:
    """Forget a received signal (the handlers stay installed)."""
    _state["signum"] = None


def _any_process_stopping() -> bool:
    """Whether any process received a stop signal (a collective: every process calls it)."""
    local = _state["signum"] is not None
    if comm.get_world_size() == 1:
        return local
    flag = torch.tensor([int(local)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class CheckpointOnStop(HookBase):
    """After every iteration but the last, if any process received a signal of
    :func:`request_stop_on`: save a checkpoint and raise :class:`TrainingInterrupted` in all
    processes (see the module docstring). Put it after the other hooks, so that an
    evaluation or checkpoint due at that iteration is done first."""

    def after_step(self):
        if not _state["installed"] or self.trainer.iter + 1 >= self.trainer.max_iter:
            return
        if not _any_process_stopping():
            return
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        self.trainer.checkpointer.save(name, iteration=iteration)  # rank 0 writes, as Detectron2's hooks
        comm.synchronize()  # the checkpoint is whole before any process leaves
        raise TrainingInterrupted(iteration, f"{self.trainer.checkpointer.save_dir}/{name}.pth", _state["signum"])
