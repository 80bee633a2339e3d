"""Submit a training to SLURM with submitit; on preemption or time limit: checkpoint, requeue, resume.

:func:`submit_training` submits ``tools/train_net.py ARGS`` (or any script of its kind) as
one SLURM job of ``nodes`` x ``tasks_per_node`` tasks, one process per GPU. Each task
(:class:`TrainingJob`) exports the process layout (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with submitit's
``TorchDistributedEnvironment`` and runs the script, whose :func:`acm_d2.engine.launch`
joins the group from it, as under torchrun.

submitit asks SLURM for ``SIGUSR2`` ``signal_delay_s`` before the time limit (and the
cluster may send it on preemption). The tasks stop after the current iteration with a
checkpoint (:mod:`acm_d2.engine.preemption`); then task 0 hands over to submitit, which
calls :meth:`TrainingJob.checkpoint` (the same job with ``--resume``) and requeues the job.
The requeued job continues from the checkpoint: on the CPU it ends with the weights of an
uninterrupted run. A signal that arrives before training started requeues the job as it is.

``submitit`` is optional (``pip install submitit``); without it only this module's
functions that submit need it, and they say so.
"""
import logging
import runpy
import signal
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from .preemption import TrainingInterrupted, request_stop_on

__all__ = ["TrainingJob", "submit_training", "parse_slurm_options", "require_submitit"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install submitit  (or: make setup, which installs it into .venv)"


def require_submitit():
    """The ``submitit`` module; ImportError with the install command if it is missing."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError(f"Submitting to SLURM needs the optional package submitit: {INSTALL_HINT}") from e
    return submitit


def parse_slurm_options(options: Sequence[str]) -> Dict[str, object]:
    """``["account=abc", "qos=high", "exclusive"]`` -> ``{"account": "abc", "qos": "high", "exclusive": True}``:
    extra ``#SBATCH --KEY=VALUE`` lines (a KEY alone is a flag such as ``--exclusive``)."""
    parsed: Dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"--slurm {option!r}: expected KEY=VALUE (e.g. account=myproject) or a flag KEY (e.g. exclusive)")
        parsed[key] = value if sep else True
    return parsed


class TrainingJob:
    """One task of a training job: runs ``script`` with ``args`` in the job's process layout.

    Picklable (submitit stores it in the job folder); ``checkpoint`` is submitit's hook that
    returns the submission to requeue: the same script and arguments plus ``--resume``.
    """

    def __init__(self, script: str, args: Sequence[str]):
        self.script = str(script)
        self.args = list(args)

    def __call__(self) -> None:
        """Run the training in this task (on every task of the job)."""
        submitit = require_submitit()
        job_env = submitit.JobEnvironment()
        layout = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        logger.info("%s: rank %d of %d, master %s:%d", job_env, layout.rank, layout.world_size,
                    layout.master_addr, layout.master_port)
        stop_signal = getattr(signal, "SIG" + job_env.USR_SIG)  # the signal submitit asks SLURM for (SIGUSR2)
        submitit_handler = signal.getsignal(stop_signal)  # checkpoint(), requeue, exit
        request_stop_on(stop_signal)
        saved_argv = sys.argv
        sys.argv = [self.script] + self.args
        try:
            runpy.run_path(self.script, run_name="__main__")
        except TrainingInterrupted as e:
            logger.warning("%s; requeueing with --resume", e)
            if layout.rank == 0:
                submitit_handler(stop_signal, None)  # exits (requeued), or raises if it may not requeue
            sys.exit(0)  # the other tasks leave without a result; the requeued job restarts them all
        finally:
            sys.argv = saved_argv

    def checkpoint(self) -> "submitit.helpers.DelayedSubmission":
        """submitit's checkpoint hook: the submission that continues this training."""
        submitit = require_submitit()
        # first: Detectron2's parser takes everything after the first KEY VALUE pair as config options
        args = self.args if "--resume" in self.args else ["--resume"] + self.args
        return submitit.helpers.DelayedSubmission(TrainingJob(self.script, args))


def submit_training(
    script: str,
    args: Sequence[str],
    folder: str,
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: Optional[int] = None,
    partition: Optional[str] = None,
    time_min: int = 60 * 24,
    cpus_per_task: int = 10,
    mem_gb: Optional[float] = None,
    signal_delay_s: int = 120,
    max_requeues: int = 10,
    slurm_options: Optional[Mapping[str, object]] = None,
    setup: Sequence[str] = (),
    name: str = "acm_d2",
    cluster: Optional[str] = None,
):
    """Submit ``script args`` as a requeueing training job; return submitit's Job.

    Args:
        script, args: the training script (``tools/train_net.py``) and its arguments.
        folder: submitit's job folder (job pickles, stdout/stderr of every task); shared by
            all nodes.
        nodes, gpus_per_node: the SLURM allocation. ``tasks_per_node`` (one process each)
            defaults to ``gpus_per_node``, or 1 without GPUs.
        partition, time_min (minutes), cpus_per_task, mem_gb (per node): SLURM's
            ``--partition``, ``--time``, ``--cpus-per-task``, ``--mem``.
        signal_delay_s: SIGUSR2 this many seconds before the time limit (one iteration and
            one checkpoint must fit); also with ``cluster="local"``.
        max_requeues: how often the job may be requeued at its time limit (preemptions do
            not count), submitit's ``max_num_timeout``.
        slurm_options: more ``#SBATCH`` options, e.g. ``{"account": "abc", "qos": "high"}``
            (see :func:`parse_slurm_options`).
        setup: shell lines run before the tasks (``module load cuda``, ``source venv/bin/activate``).
        cluster: None (SLURM if ``sbatch`` is found, else local processes), "slurm", or
            "local" (processes on this machine, for trying a job out).
    """
    submitit = require_submitit()
    if cluster not in (None, "slurm", "local"):
        raise ValueError(f"cluster must be None, 'slurm' or 'local', got {cluster!r}")
    if tasks_per_node is None:
        tasks_per_node = gpus_per_node or 1
    cluster = cluster or submitit.AutoExecutor.which()
    if cluster == "local":
        # The local executor plays SLURM's part: SIGUSR2 signal_delay_s before the time limit,
        # tasks started again on a requeue (AutoExecutor does not pass it the signal delay).
        if slurm_options or partition:
            logger.warning("cluster local: the SLURM options (partition, --slurm) are not used")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
        executor.update_parameters(
            nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node, timeout_min=time_min,
            signal_delay_s=signal_delay_s, setup=list(setup),
        )
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues)
        executor.update_parameters(
            name=name, nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node or None,
            cpus_per_task=cpus_per_task, timeout_min=time_min, mem_gb=mem_gb,
            slurm_partition=partition, slurm_signal_delay_s=signal_delay_s,
            slurm_additional_parameters=dict(slurm_options or {}), slurm_setup=list(setup),
        )
    job = executor.submit(TrainingJob(str(Path(script).resolve()), args))
    logger.info("Submitted job %s (%s): %d node(s) x %d task(s); logs in %s", job.job_id, cluster,
                nodes, tasks_per_node, folder)
    return job
