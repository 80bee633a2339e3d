"""A run owns its OUTPUT_DIR: one training at a time, no silent overwrite, resume checked first.

:func:`prepare_output_dir` runs before anything is written into ``OUTPUT_DIR`` (before
Detectron2's ``default_setup`` writes ``config.yaml`` and opens ``log.txt``):

1. :class:`OutputDirLock`: the main process takes an exclusive lock on
   ``OUTPUT_DIR/.acm_d2.lock`` (``flock``, which works on NFS too) and writes its process id,
   host, start time and command into it. A second run into the same folder is refused at
   once, naming that process. The kernel releases the lock when the process ends, also on
   ``kill -9``; the file of a killed run is then a stale lock, which the next run detects (the
   lock is free), reports and takes over. A clean exit removes the file.
2. Without ``--resume`` (or with it but no ``last_checkpoint`` naming an existing checkpoint),
   a folder that holds checkpoints of an earlier run (``last_checkpoint``, ``model_*.pth``) is
   refused: the new run would overwrite them and append to the old ``metrics.json``. With
   ``overwrite`` (``--overwrite``) the earlier run's files are moved into
   ``OUTPUT_DIR/previous_runs/<time>/`` first: nothing is lost, nothing is mixed. An earlier
   run that left a ``metrics.json`` but no checkpoint is moved there too, without a flag.
3. With ``--resume``, the config stored in the checkpoint that ``last_checkpoint`` names is
   compared with the new one (:func:`acm_d2.engine.resume_check.check_resumed_config`);
   changes that would break the run are refused here, before any iteration and any file, as
   is a checkpoint without training state (weights only), one of an iteration beyond
   ``SOLVER.MAX_ITER - 1``, and one whose tensors do not fit the model (another shape, missing,
   or not in the model): a resume continues with every tensor of the checkpoint, whereas
   Detectron2 would skip a mismatched one with a warning and leave it at random.
   Lines of ``metrics.json`` from iterations after that checkpoint (the interrupted run did
   them, the resumed run does them again) are removed, so every iteration is logged once.
4. With ``eval_only`` (``--eval-only``), the evaluation writes into a folder of its own,
   ``OUTPUT_DIR/eval/<stem of the weights file>/`` (its ``config.yaml``, ``log.txt``,
   ``inference/``), which it locks: the files of a training run in ``OUTPUT_DIR`` are left as
   they are. ``overwrite`` moves ``eval/`` with the other files of a run.
"""
import atexit
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Dict, List, Optional

import torch
from detectron2.engine import DefaultTrainer
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from ..checkpoint import CheckpointLoadError, safe_torch_load
from .resume_check import ResumeConfigError, check_resumed_config

__all__ = [
    "OutputDirInUseError", "OutputDirNotEmptyError", "OutputDirLock", "check_resume_checkpoint", "lock_output_dir",
    "prepare_output_dir",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".acm_d2.lock"
#: Files and folders of a run, moved aside by ``overwrite``.
RUN_FILES = ("last_checkpoint", "metrics.json", "config.yaml", "log.txt", "inference", "inference_TTA", "eval")
RUN_FILE_PREFIXES = ("model_", "events.out.tfevents.")


class OutputDirInUseError(RuntimeError):
    """Another process is training into the same OUTPUT_DIR."""


class OutputDirNotEmptyError(FileExistsError):
    """OUTPUT_DIR holds an earlier run's checkpoints, and neither resume nor overwrite was asked for."""


def _owner_text(info: Optional[dict]) -> str:
    if not info:
        return "a process that wrote no details"
    return (
        f"process {info.get('pid')} on host {info.get('host')}, started {info.get('started')} "
        f"(command: {info.get('command')})"
    )


class OutputDirLock:
    """An exclusive lock on ``OUTPUT_DIR/.acm_d2.lock``, held until :meth:`release` or the
    process ends (see the module docstring); also a context manager. A subclass locks another
    file (``lock_name``) of a folder and raises its own error (:meth:`in_use_error`)."""

    lock_name = LOCK_NAME
    #: What the folder is, in messages.
    what = "OUTPUT_DIR"

    def __init__(self, output_dir: str):
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, self.lock_name)
        self._fd: Optional[int] = None

    def _read(self, fd: int) -> Optional[dict]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode(errors="replace")
        try:
            info = json.loads(text)
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputDirInUseError` naming the process holding it."""
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                raise self.in_use_error(_owner_text(owner)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # the holder removed it as we opened it: try again
                same = False
            if same:
                break
            os.close(fd)
        stale = self._read(fd)
        if stale:
            logger.warning(
                "%s %s has a stale lock of %s: that process ended without releasing it (killed or crashed); "
                "taking it over", self.what, self.output_dir, _owner_text(stale),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        # A forked child (a data-loader worker) gets a copy of the descriptor, and flock stays
        # held while any copy is open: the child drops its copy, so the lock ends with this
        # process (a worker that outlives a killed trainer would hold it), and never unlinks it.
        os.register_at_fork(after_in_child=self._forget_in_child)

    def in_use_error(self, owner: str) -> Exception:
        """The error raised when another process holds the lock; ``owner`` names that process."""
        return OutputDirInUseError(
            f"OUTPUT_DIR {self.output_dir} is in use by another run: {owner}. Two runs in one OUTPUT_DIR would "
            f"overwrite each other's checkpoints and mix their metrics. Wait for it to end, or set another OUTPUT_DIR."
        )

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _forget_in_child(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def release(self) -> None:
        """Remove the lock file and release the lock (the removal first: no one else holds it)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


_HELD: Dict[str, OutputDirLock] = {}


def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()
    _HELD.clear()


atexit.register(_release_all)


def lock_output_dir(output_dir: str) -> OutputDirLock:
    """Lock ``output_dir`` for this process (again: nothing to do); released at exit."""
    key = os.path.realpath(output_dir)
    if key not in _HELD:
        lock = OutputDirLock(output_dir)
        lock.acquire()
        _HELD[key] = lock
    return _HELD[key]


def _run_files(output_dir: str) -> List[str]:
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    return [n for n in names if n in RUN_FILES or n.startswith(RUN_FILE_PREFIXES)]


def _checkpoint_files(output_dir: str) -> List[str]:
    return [n for n in _run_files(output_dir) if n == "last_checkpoint" or (n.startswith("model_") and n.endswith(".pth"))]


def _move_previous_run(output_dir: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(output_dir, "previous_runs", stamp)
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(output_dir, "previous_runs", f"{stamp}-{suffix}")
        suffix += 1
    os.makedirs(target)
    moved = _run_files(output_dir)
    for name in moved:
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    logger.warning("--overwrite: moved the earlier run's files %s from %s into %s", moved, output_dir, target)
    return target


def _resumed_iteration(checkpoint: dict, checkpoint_file: str, cfg) -> int:
    """The iteration of the training state in ``checkpoint``; refuse a file without one
    (weights only) and one of an iteration beyond ``SOLVER.MAX_ITER - 1``."""
    state = checkpoint.get("trainer")
    iteration = state.get("iteration") if isinstance(state, dict) else None
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        raise CheckpointLoadError(
            f"--resume from {checkpoint_file} (named by {os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')}): the file "
            f"holds model weights but no training state (no 'trainer' entry with an integer 'iteration'), so there is "
            f"no run to resume; a resume would start at iteration 1 and overwrite this run's checkpoints and "
            f"metrics.json. To fine-tune from it, set MODEL.WEIGHTS {checkpoint_file} in another OUTPUT_DIR (or pass "
            f"--overwrite, which moves this run's files into previous_runs/) and leave out --resume. Nothing was run "
            f"or written."
        )
    # The trainer's MAX_ITER: scaled by SOLVER.REFERENCE_WORLD_SIZE as DefaultTrainer does.
    max_iter = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size()).SOLVER.MAX_ITER
    if iteration + 1 > max_iter:  # (a finished run's model_final.pth is of iteration MAX_ITER - 1)
        scaled = "" if max_iter == cfg.SOLVER.MAX_ITER else (
            f", scaled from {cfg.SOLVER.MAX_ITER} for {comm.get_world_size()} processes by SOLVER.REFERENCE_WORLD_SIZE"
        )
        raise ResumeConfigError(
            f"--resume from {checkpoint_file}: the checkpoint is of iteration {iteration}, beyond SOLVER.MAX_ITER "
            f"{max_iter}{scaled} (the last iteration of a run is MAX_ITER - 1 = {max_iter - 1}): there is nothing "
            f"left to train, and its weights are not those of a run of {max_iter} iterations. Set SOLVER.MAX_ITER to "
            f"at least {iteration + 1} to continue it (SOLVER.MAX_ITER {iteration + 1} evaluates it as it is), or "
            f"evaluate it with --eval-only MODEL.WEIGHTS {checkpoint_file}. Nothing was run or written."
        )
    return iteration


def _check_model_tensors(checkpoint: dict, checkpoint_file: str, cfg, model: Optional[torch.nn.Module]) -> None:
    """Refuse a checkpoint whose "model" does not have every tensor of ``model`` with its shape,
    or has tensors the model does not have (BN's num_batches_tracked aside). Without ``model``,
    the model of ``cfg`` is built on the meta device: shapes only, no memory, no initialisation."""
    if model is None:
        with torch.device("meta"):
            model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    stored = checkpoint.get("model")
    stored = stored if isinstance(stored, dict) else {}
    theirs = {k: tuple(getattr(v, "shape", ())) for k, v in stored.items() if not k.endswith("num_batches_tracked")}
    shapes = [(k, theirs[k], ours[k]) for k in ours if k in theirs and theirs[k] != ours[k]]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    if not (shapes or missing or unexpected):
        return
    lines = []
    if shapes:
        lines.append(f"  {len(shapes)} tensor(s) of another shape (key: checkpoint shape vs model shape):")
        lines += [f"    {k}: checkpoint {a} vs model {b}" for k, a, b in shapes[:10]]
    if missing:
        lines.append(f"  {len(missing)} model tensor(s) missing from the checkpoint: {missing[:10]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} checkpoint tensor(s) the model does not have: {unexpected[:10]}")
    body = "\n".join(lines)
    raise CheckpointLoadError(
        f"--resume from {checkpoint_file}: the checkpoint's model does not fit this model (a resumed run continues "
        f"with every tensor of the checkpoint):\n{body}\n"
        f"Resume with the config the checkpoint was trained with (MODEL.*), or fine-tune from it: set MODEL.WEIGHTS "
        f"{checkpoint_file} in another OUTPUT_DIR (or pass --overwrite) and leave out --resume, which loads what fits "
        f"as Detectron2 does. Nothing was run or written."
    )


def check_resume_checkpoint(cfg, checkpoint_file: str, model: Optional[torch.nn.Module] = None, log_changes: bool = True) -> int:
    """Check that ``checkpoint_file`` (named by ``OUTPUT_DIR/last_checkpoint``) can resume the run
    of ``cfg`` (the config as given, before DefaultTrainer's scaling) and ``model`` (None: the
    model of ``cfg``, built on the meta device); the tensors are not read into memory. Returns
    the checkpoint's iteration.

    Raises:
        acm_d2.checkpoint.CheckpointLoadError: the file holds no training state (weights only),
            or its tensors do not fit the model (another shape, missing, not in the model).
        acm_d2.engine.resume_check.ResumeConfigError: its iteration is beyond SOLVER.MAX_ITER - 1,
            or the config differs in a way that breaks the run.
    """
    checkpoint = safe_torch_load(checkpoint_file, mmap=True)
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    iteration = _resumed_iteration(checkpoint, checkpoint_file, cfg)
    check_resumed_config(checkpoint["trainer"].get("config"), cfg, checkpoint_file, log_changes=log_changes)
    _check_model_tensors(checkpoint, checkpoint_file, cfg, model)
    return iteration


def _drop_metrics_after(output_dir: str, iteration: int) -> None:
    """Remove the lines of metrics.json logged after ``iteration`` (they are done again)."""
    from .checkpointer import atomic_write

    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            it = json.loads(line).get("iteration")
        except (ValueError, AttributeError):
            it = None
        if not (isinstance(it, int) and it > iteration):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        logger.info("Resuming after iteration %d: removing %d lines of %s logged after it", iteration, len(lines) - len(kept), path)
        atomic_write(path, lambda f: f.writelines(kept), mode="w")


def prepare_output_dir(cfg, resume: bool, overwrite: bool = False, eval_only: bool = False):
    """Lock ``cfg.OUTPUT_DIR`` and check it for this run; see the module docstring. Returns the
    config to run with: ``cfg`` itself, or for ``eval_only`` a copy whose OUTPUT_DIR is
    ``OUTPUT_DIR/eval/<stem of the weights file>/`` and whose MODEL.WEIGHTS is the file to
    evaluate (with ``resume``, the checkpoint that ``last_checkpoint`` names, if any).

    Call it in every process before anything is written into OUTPUT_DIR; the main process
    does the work, the others wait for it.

    Raises:
        OutputDirInUseError: another run holds the lock (named).
        OutputDirNotEmptyError: checkpoints of an earlier run, neither ``resume`` nor ``overwrite``.
        acm_d2.engine.resume_check.ResumeConfigError: ``resume`` with a config change that
            would break the run, or from a checkpoint of an iteration beyond SOLVER.MAX_ITER - 1.
        acm_d2.checkpoint.CheckpointLoadError: the checkpoint cannot be read, holds no training
            state, or its tensors do not fit the model.
        ValueError: ``eval_only`` without weights to evaluate.
    """
    if eval_only:
        cfg = _eval_only_cfg(cfg, resume)
    if comm.is_main_process():
        _prepare(cfg, resume, overwrite, eval_only)
    comm.synchronize()
    return cfg


def _eval_only_cfg(cfg, resume: bool):
    """``cfg`` with OUTPUT_DIR ``OUTPUT_DIR/eval/<stem>/`` and MODEL.WEIGHTS the file evaluated:
    an evaluation never rewrites the config.yaml or the inference/ results of the run in
    OUTPUT_DIR."""
    from .checkpointer import SafeCheckpointer

    weights = cfg.MODEL.WEIGHTS
    if resume:
        checkpointer = SafeCheckpointer(torch.nn.Module(), cfg.OUTPUT_DIR)
        if checkpointer.has_checkpoint():
            weights = checkpointer.get_checkpoint_file()
    if not weights:
        raise ValueError(
            "--eval-only needs trained weights: set MODEL.WEIGHTS path/to/model_final.pth, or pass --resume with "
            f"a checkpoint in OUTPUT_DIR ({cfg.OUTPUT_DIR}); evaluating a randomly initialised model is refused"
        )
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    if cfg.OUTPUT_DIR:
        stem = os.path.splitext(os.path.basename(weights.split("?")[0].rstrip("/")))[0] or "weights"
        cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "eval", stem)
    if frozen:
        cfg.freeze()
    return cfg


def _prepare(cfg, resume: bool, overwrite: bool, eval_only: bool) -> None:
    from .checkpointer import SafeCheckpointer

    output_dir = cfg.OUTPUT_DIR
    if not output_dir or "://" in output_dir:  # remote storage: no local lock
        return
    lock_output_dir(output_dir)
    if eval_only:
        return
    checkpoint_file = SafeCheckpointer(torch.nn.Module(), output_dir).get_checkpoint_file() if resume else ""
    if checkpoint_file and os.path.isfile(checkpoint_file):
        _drop_metrics_after(output_dir, check_resume_checkpoint(cfg, checkpoint_file))
        return
    # The run starts at iteration 0 (no --resume, or nothing to resume from).
    found = _checkpoint_files(output_dir)
    if found:
        if not overwrite:
            if resume:
                raise OutputDirNotEmptyError(
                    f"--resume: OUTPUT_DIR {os.path.abspath(output_dir)} has checkpoints ({', '.join(found[-4:])}) but no "
                    f"last_checkpoint naming an existing one to resume from, so the run would start from MODEL.WEIGHTS at "
                    f"iteration 0 and overwrite them. Write the file name of the checkpoint to resume into "
                    f"{os.path.join(output_dir, 'last_checkpoint')}, or pass --overwrite to start afresh."
                )
            raise OutputDirNotEmptyError(
                f"OUTPUT_DIR {os.path.abspath(output_dir)} holds the checkpoints of an earlier run ({', '.join(found[-4:])}): "
                f"a new run would overwrite them and append to its metrics.json. Pass --resume to continue that run, "
                f"--overwrite to start afresh (its files are moved into {os.path.join(output_dir, 'previous_runs')}/), "
                f"or set another OUTPUT_DIR."
            )
    if found or os.path.isfile(os.path.join(output_dir, "metrics.json")):
        # (overwrite, or an earlier run that wrote metrics but no checkpoint: moved, not mixed)
        _move_previous_run(output_dir)
