"""Start training processes: Detectron2's ``launch``, or join processes started by torchrun/SLURM.

:func:`launch` has the signature of Detectron2's ``launch`` and picks one of two ways:

* **Started by an external launcher** (``torchrun``, TorchX, Kubernetes, the SLURM jobs of
  :mod:`acm_d2.engine.slurm`): the environment holds ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (some but not all
  of them set is refused). Every process holds the roll call of
  :func:`acm_d2.engine.rendezvous.join_from_environment` on the store ``env://`` uses, joins
  the group on it and runs ``main_func`` itself; nothing is spawned. ``--num-gpus``, ``--num-machines``, ``--machine-rank`` and
  ``--dist-url`` are then the launcher's business (``torchrun --nnodes --nproc_per_node``).
* **Otherwise** ``num_gpus_per_machine`` processes are spawned on each of ``num_machines``
  machines, which join at ``dist_url``. Settings that can never form a group are refused at
  once (:func:`check_launch_settings`); with a ``tcp://`` or "auto" URL the workers first hold
  a roll call (:mod:`acm_d2.engine.rendezvous`): disagreeing machines and ranks missing after
  ``$ACM_D2_JOIN_TIMEOUT`` seconds (default 600) end every worker with a message naming them,
  and Ctrl-C ends every worker. Other URLs (``file://``) go through Detectron2's ``launch``.

Either way the backend is NCCL for models on GPUs and gloo for CPU training (``MODEL.DEVICE
cpu``, or no CUDA). For CPU training with several processes on a machine that has GPUs,
the spawned workers are started with the GPUs hidden (Detectron2 would pick NCCL).

A worker whose ``main_func`` raises logs ``Rank R (machine M, local rank L) failed`` (and adds
it to the error's traceback on Python >= 3.11) before the error propagates. A worker that
dies without a Python error (killed by a signal, ``os._exit``) cannot say so itself: torchrun
reports the failed rank, and with Detectron2's spawning :func:`launch` raises
:class:`WorkerFailedError`, which names the global rank (torch reports only the index of the
process on its machine). The other processes stop: their collectives fail when the peer's
connections close, or torchrun ends them.
"""
import logging
import os
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from .rendezvous import default_join_timeout, join_from_environment, spawn_and_join

__all__ = ["launch", "check_launch_settings", "external_launcher_environment", "WorkerFailedError"]

logger = logging.getLogger(__name__)

#: Variables an external launcher (torchrun, submitit's TorchDistributedEnvironment) sets.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def external_launcher_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """The process layout set by an external launcher, or None if this process was not started by one.

    Returns:
        ``{"rank", "world_size", "local_rank", "local_world_size"}`` (ints), when ``RANK``,
        ``WORLD_SIZE`` and ``LOCAL_RANK`` are set.

    Raises:
        ValueError: some of :data:`LAUNCHER_VARIABLES` are set but not all of them (but a lone
            ``RANK=0`` / ``WORLD_SIZE=1``), or the values are inconsistent.
    """
    environ = os.environ if environ is None else environ
    present = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in environ]
    if not present or (len(present) < 3 and environ.get("WORLD_SIZE", "1") == "1" and environ.get("RANK", "0") == "0"):
        return None  # no launcher (a lone RANK=0 / WORLD_SIZE=1 of some environment changes nothing)
    missing = [k for k in LAUNCHER_VARIABLES if k not in environ]
    if missing:
        raise ValueError(
            f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} set (as by an external launcher such as "
            f"torchrun), but {missing} {'is' if len(missing) == 1 else 'are'} not: without them this process would "
            f"train alone. Set all of {list(LAUNCHER_VARIABLES)} (torchrun does), or unset {present}"
        )
    layout = {
        "rank": int(environ["RANK"]),
        "world_size": int(environ["WORLD_SIZE"]),
        "local_rank": int(environ["LOCAL_RANK"]),
        "local_world_size": int(environ["LOCAL_WORLD_SIZE"]),
    }
    if not (0 <= layout["rank"] < layout["world_size"] and 0 <= layout["local_rank"] < layout["local_world_size"]):
        raise ValueError(f"Inconsistent launcher environment: {layout}")
    if layout["world_size"] % layout["local_world_size"]:
        raise ValueError(
            f"WORLD_SIZE {layout['world_size']} is not a multiple of LOCAL_WORLD_SIZE {layout['local_world_size']}: "
            f"every machine must run the same number of processes"
        )
    return layout


class WorkerFailedError(RuntimeError):
    """A training process started by :func:`launch` (Detectron2's spawning) raised or died.

    Attributes:
        rank: its global rank (``machine_rank * num_gpus_per_machine + local_rank``).
        machine_rank, local_rank: the machine and the process's index on it.
    """

    def __init__(self, rank: int, machine_rank: int, local_rank: int, cause: Exception):
        exit_code = getattr(cause, "exit_code", None)
        how = "raised an error"
        if exit_code is not None:
            signal_name = getattr(cause, "signal_name", None)
            how = f"died with {signal_name}" if signal_name else f"exited with code {exit_code} without a Python error"
            if signal_name == "SIGKILL":
                how += " (often the out-of-memory killer: lower SOLVER.IMS_PER_BATCH or DATALOADER.NUM_WORKERS)"
        super().__init__(f"Rank {rank} (machine {machine_rank}, local rank {local_rank}) {how}: {cause}")
        self.rank, self.machine_rank, self.local_rank = rank, machine_rank, local_rank


def _backend(device: str) -> str:
    """"nccl" for training on GPUs, "gloo" for CPU training (``device`` "cpu") or without CUDA."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


class _RankNamedMain:
    """``main_func(*args)``, logging the rank, machine and local rank if it raises (picklable for spawn)."""

    def __init__(self, main_func):
        self.main_func = main_func

    def __call__(self, *args):
        try:
            return self.main_func(*args)
        except Exception as e:
            rank = comm.get_rank()
            where = f"Rank {rank} (machine {rank // comm.get_local_size()}, local rank {comm.get_local_rank()}) failed"
            logger.error("%s: %s: %s", where, type(e).__name__, e)
            if hasattr(e, "add_note"):  # Python >= 3.11: the traceback printed to stderr names the rank too
                e.add_note(where)
            raise


def _join_external_group(main_func, layout: dict, num_gpus_per_machine: int, args, timeout, device: str):
    """Join the process group described by the launcher's environment and run ``main_func(*args)``."""
    if num_gpus_per_machine not in (1, layout["local_world_size"]):
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} with a launcher that started {layout['local_world_size']} "
            f"processes per machine (LOCAL_WORLD_SIZE): the launcher sets the number of processes "
            f"(torchrun --nproc_per_node); leave --num-gpus at 1 or set it to {layout['local_world_size']}"
        )
    if layout["world_size"] == 1:
        return main_func(*args)
    backend = _backend(device)
    if backend == "nccl":  # GPU LOCAL_RANK when the node's GPUs are visible, GPU 0 when one per process is
        torch.cuda.set_device(layout["local_rank"] % torch.cuda.device_count())
    logger.info(
        "Joining the process group of the launcher: rank %d of %d (local rank %d of %d), %s, %s:%s",
        layout["rank"], layout["world_size"], layout["local_rank"], layout["local_world_size"], backend,
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
    )
    join_from_environment(layout, backend, timeout)  # the roll call, then the group on its store
    comm.create_local_process_group(layout["local_world_size"])
    comm.synchronize()
    result = _RankNamedMain(main_func)(*args)
    dist.destroy_process_group()  # only after success: with a failed peer this could block; a failing process just ends
    return result


def check_launch_settings(num_gpus_per_machine, num_machines: int, machine_rank: int, dist_url) -> None:
    """Refuse at once the settings with which the processes can never form a group.

    Raises:
        ValueError: naming the flag, its value and the allowed values.
    """
    for flag, value in (("--num-gpus", num_gpus_per_machine), ("--num-machines", num_machines)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} {value!r}: expected an integer >= 1 (processes per machine / machines)")
    if not isinstance(machine_rank, int) or not 0 <= machine_rank < num_machines:
        raise ValueError(
            f"--machine-rank {machine_rank!r} with --num-machines {num_machines}: expected 0..{num_machines - 1} "
            f"(each machine its own rank; machine 0 serves --dist-url)"
        )
    if num_machines > 1 and dist_url == "auto":
        raise ValueError(
            f"--dist-url auto picks a port on this machine only; with --num-machines {num_machines} give "
            f"tcp://HOST0:PORT, HOST0 being machine 0's address"
        )


def _spawn(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout, device=""):
    """Start the workers (tcp:// or auto: :func:`acm_d2.engine.rendezvous.spawn_and_join`, which
    names missing ranks and ends every worker on Ctrl-C; other URLs: Detectron2's ``launch``); a
    failed worker process is reported as :class:`WorkerFailedError`."""
    try:
        world_size = num_machines * num_gpus_per_machine
        if world_size > 1 and dist_url is not None and (dist_url == "auto" or dist_url.startswith("tcp://")):
            return spawn_and_join(
                main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout,
                default_join_timeout(), _backend(device),
            )
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        local_rank = e.error_index
        raise WorkerFailedError(machine_rank * num_gpus_per_machine + local_rank, machine_rank, local_rank, e) from e


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "",
):
    """Run ``main_func(*args)`` in every training process (see the module docstring).

    Args:
        main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout:
            as in Detectron2's ``launch``; ``num_gpus_per_machine`` is the number of
            processes per machine, ``timeout`` the limit of every collective operation.
            Under an external launcher only ``main_func``, ``args`` and ``timeout`` are used.
        device: the model's device (``cfg.MODEL.DEVICE``); "cpu" selects gloo.
    """
    layout = external_launcher_environment()
    if layout is not None:
        if num_machines != 1 or machine_rank != 0:
            logger.warning(
                "Started by an external launcher: --num-machines %d / --machine-rank %d are ignored "
                "(RANK %d of WORLD_SIZE %d from the environment)",
                num_machines, machine_rank, layout["rank"], layout["world_size"],
            )
        return _join_external_group(main_func, layout, num_gpus_per_machine, args, timeout, device)

    check_launch_settings(num_gpus_per_machine, num_machines, machine_rank, dist_url)
    world_size = num_machines * num_gpus_per_machine
    if world_size > 1:
        main_func = _RankNamedMain(main_func)
    hide_gpus = device == "cpu" and world_size > 1 and torch.cuda.is_available()
    if not hide_gpus:
        return _spawn(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout, device)
    logger.info("MODEL.DEVICE is cpu: starting %d CPU processes (gloo) with the GPUs hidden", num_gpus_per_machine)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return _spawn(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout, device)
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
