"""A grid of trainings, backbones x variants x seeds, run locally or as SLURM jobs, resumable.

Every run is one ``tools/train_net.py --resume`` training + COCO evaluation of a config with
the run's overrides: the backbone's (:data:`BACKBONES`, the depth / ResNeXt settings of
Detectron2's model-zoo configs), the variant's (:data:`acm_d2.experiments.comparison.VARIANTS`)
and ``SEED``. Its folder is ``OUT/[BACKBONE/]VARIANT/seed<N>``; what happened to it is kept there:

* ``identity.json``: what determines the run (:func:`run_identity`): the SHA-256 of its
  resolved config (the config file with its ``_BASE_`` files and the run's overrides, as
  Detectron2 dumps it: the content, not the path) and the code version (acm_d2's version, the
  last git commit of the checkout's ``acm_d2/``, ``configs/`` and ``tools/`` and a hash of their
  uncommitted changes, where it is a git checkout). Written when a training starts. A folder
  whose identity is not the requested one (or that has none: an earlier version's) is never
  reused, resumed or retried: it is moved aside to ``seed<N>.superseded-<time>`` (kept, as it
  was) and the run trains from scratch in a fresh ``seed<N>``;
* ``result.json``: finished (metrics, the overrides and the identity it was trained with):
  reused, never trained again while its identity matches;
* ``job.json``: submitted to SLURM (or submitit's local executor): the job id, its folder and
  its process id and start time for local jobs (:func:`_local_job_alive`); a job still pending
  or running is not submitted again; one whose SLURM state cannot be read (UNKNOWN, e.g. no
  sacct) for :data:`UNKNOWN_STATE_LIMIT_S` is reported as failed, not waited on, and kept;
* ``failed.json``: the last attempt failed (a diverged training, a job that died): listed
  with the last lines of its log, retried only when asked (``retry_failed``);
* ``attempts.jsonl``: one line per training started, local or submitted.

:func:`plan` lists the runs of a grid, :func:`run_grid` brings every run to an end (or leaves
the jobs running and returns, with ``wait`` False) and returns the results that exist.
"""
import datetime
import hashlib
import json
import logging
import os
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..engine.run_dir import OutputDirLock
from .runs import REPO, read_final_metrics, run_train_net

__all__ = ["BACKBONES", "GridInUseError", "GridLock", "GridRun", "SlurmSettings", "backbone_of", "backbone_overrides", "code_version", "plan",
           "run_grid", "run_identity"]

logger = logging.getLogger(__name__)

TRAIN_NET = REPO / "tools" / "train_net.py"

#: Backbone name -> its MODEL.RESNETS settings and ImageNet weights in Detectron2's model
#: zoo (configs COCO-InstanceSegmentation/mask_rcnn_<name>_FPN_*.yaml; no R-18 / R-34 there).
BACKBONES = {
    "R_18": {"resnets": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": True},
             "weights": None},
    "R_34": {"resnets": {"DEPTH": 34, "RES2_OUT_CHANNELS": 64, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": True},
             "weights": None},
    "R_50": {"resnets": {"DEPTH": 50, "RES2_OUT_CHANNELS": 256, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": True},
             "weights": ("detectron2://ImageNetPretrained/MSRA/R-50.pkl", [1.0, 1.0, 1.0])},
    "R_101": {"resnets": {"DEPTH": 101, "RES2_OUT_CHANNELS": 256, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": True},
              "weights": ("detectron2://ImageNetPretrained/MSRA/R-101.pkl", [1.0, 1.0, 1.0])},
    "X_101_32x8d": {"resnets": {"DEPTH": 101, "RES2_OUT_CHANNELS": 256, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 8,
                                "STRIDE_IN_1X1": False},
                    "weights": ("detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl", [57.375, 57.120, 58.395])},
}
_IMAGENET = "detectron2://ImageNetPretrained/"
# SLURM states of a job that may still train (sacct / squeue names).
_SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "UNKNOWN"}
#: Seconds a SLURM job's state may stay UNKNOWN (submitit's answer when sacct fails or does not
#: know the job) before the grid stops waiting on it, from the first UNKNOWN that call saw.
UNKNOWN_STATE_LIMIT_S = 600.0


class GridInUseError(RuntimeError):
    """Another process works on the grid's runs (another grid command, or a job of another config)."""


class GridLock(OutputDirLock):
    """An exclusive lock of a grid command on its output folder, ``OUT/.acm_d2_grid.lock``
    (flock, with the holder's pid, host, start time and command inside; a stale one of a killed
    command is taken over, as :class:`~acm_d2.engine.run_dir.OutputDirLock` does):
    :class:`GridInUseError` naming the holder while another grid command holds it."""

    lock_name = ".acm_d2_grid.lock"
    what = "the grid output folder"

    def in_use_error(self, owner: str) -> Exception:
        return GridInUseError(
            f"the grid output folder {self.output_dir} is in use by another grid command: {owner}. Two grid commands "
            f"on one folder would submit or train the same runs twice and write one report over the other; wait for "
            f"it to end, or set another --output-dir."
        )


def backbone_overrides(name: str, config_weights: str) -> List[str]:
    """``KEY VALUE`` overrides that make a config's ResNet the backbone ``name``; a config
    that starts from ImageNet weights (``config_weights`` a model-zoo ImageNet URL) gets the
    backbone's own, with their pixel std."""
    if name not in BACKBONES:
        raise ValueError(f"--backbones: unknown backbone {name!r}; choose from {list(BACKBONES)}")
    spec = BACKBONES[name]
    opts: List[str] = []
    for key, value in spec["resnets"].items():
        opts += [f"MODEL.RESNETS.{key}", str(value)]
    if str(config_weights).startswith(_IMAGENET):
        if spec["weights"] is None:
            raise ValueError(
                f"--backbones {name}: the config starts from ImageNet weights ({config_weights}), and Detectron2's model "
                f"zoo has none for {name}; choose from {[n for n, s in BACKBONES.items() if s['weights']]}, or train from "
                f"scratch (MODEL.WEIGHTS '' with BN or GN)"
            )
        weights, std = spec["weights"]
        opts += ["MODEL.WEIGHTS", weights, "MODEL.PIXEL_STD", str(std)]
    return opts


def backbone_of(cfg) -> Optional[str]:
    """The name in :data:`BACKBONES` of a config's ResNet (depth, groups, width), or None."""
    resnets = cfg.MODEL.RESNETS
    for name, spec in BACKBONES.items():
        wanted = spec["resnets"]
        if (resnets.DEPTH, resnets.NUM_GROUPS, resnets.WIDTH_PER_GROUP) == (wanted["DEPTH"], wanted["NUM_GROUPS"], wanted["WIDTH_PER_GROUP"]):
            return name
    return None


@dataclass
class SlurmSettings:
    """One SLURM job per run: ``nodes`` x ``gpus_per_node`` (one process each), ``time_min``
    minutes per job run (it requeues itself with --resume before the limit or on preemption),
    ``partition``, ``account``, more ``#SBATCH`` options, shell ``setup`` lines, and
    ``cluster`` "slurm" or "local" (submitit's local executor, for trying a grid out)."""

    nodes: int = 1
    gpus_per_node: int = 8
    time_min: int = 60 * 24
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_task: int = 10
    options: Dict[str, object] = field(default_factory=dict)
    setup: Sequence[str] = ()
    cluster: Optional[str] = None


@dataclass
class GridRun:
    """One run of a grid: its backbone (None: the config's own), variant and seed, its
    folder and the ``KEY VALUE`` overrides it trains with (after the base overrides)."""

    backbone: Optional[str]
    variant: str
    seed: int
    run_dir: Path
    opts: List[str]
    identity: Dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backbone + ' ' if self.backbone else ''}{self.variant} seed {self.seed}"

    def train_net_args(self, config_file: str) -> List[str]:
        """The arguments of tools/train_net.py for this run (``--resume``: a retried run continues)."""
        return ["--resume", "--config-file", str(config_file), *self.opts, "OUTPUT_DIR", str(self.run_dir)]

    def command(self, config_file: str) -> str:
        """This run as a command line, run from the checkout's top folder."""
        return shlex.join(["python", "tools/train_net.py", *self.train_net_args(config_file)])


def _safe(name: str) -> str:
    """A folder name for a variant: "P(X+K)" -> "P_X+K_"."""
    return "".join(ch if ch.isalnum() or ch in "+-=" else "_" for ch in name)


_CODE_PATHS = ("acm_d2", "configs", "tools")


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> Dict[str, Optional[str]]:
    """The code that trains a run: {"acm_d2": the package's version, "commit": the last git
    commit of the checkout's acm_d2/, configs/ and tools/ (None: not a git checkout, e.g. an
    installed wheel, or no git), "uncommitted": SHA-256 of ``git diff HEAD`` of those folders
    (None: no uncommitted change)}. Untracked files are not seen."""
    from .. import __version__

    version = {"acm_d2": __version__, "commit": None, "uncommitted": None}
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != REPO.resolve():  # e.g. site-packages inside another checkout
        return version
    commit = _git("log", "-1", "--format=%H", "--", *_CODE_PATHS)
    diff = _git("diff", "HEAD", "--", *_CODE_PATHS)
    version["commit"] = commit.strip() or None if commit else None
    version["uncommitted"] = hashlib.sha256(diff.encode()).hexdigest() if diff else None
    return version


def run_identity(config_file: str, opts: Sequence[str], code: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
    """What determines a run: {"config_sha256": SHA-256 of Detectron2's dump of the config
    merged from ``config_file`` (and its ``_BASE_`` files) and ``opts``, **code}."""
    from ..config import get_acm_cfg

    dump = get_acm_cfg(str(config_file), list(opts)).dump()
    return {"config_sha256": hashlib.sha256(dump.encode()).hexdigest(), **code}


def plan(config_file: str, output_dir, backbones: Sequence[Optional[str]], variants: Sequence[str], seeds: int,
         base_opts: Sequence[str], variant_opts: Dict[str, List[str]], config_weights: str = "") -> List[GridRun]:
    """Every (backbone, variant, seed) of the grid, seeds outermost (a partial grid has every
    cell), each with its :func:`run_identity`; ``backbones`` [None] keeps the config's own backbone."""
    out = Path(output_dir).resolve()
    code = code_version()
    runs = []
    for seed in range(seeds):
        for backbone in backbones:
            backbone_opts = backbone_overrides(backbone, config_weights) if backbone else []
            for variant in variants:
                run_dir = out / (_safe(backbone) if backbone else "") / _safe(variant) / f"seed{seed}"
                opts = list(base_opts) + backbone_opts + list(variant_opts[variant]) + ["SEED", str(seed)]
                runs.append(GridRun(backbone, variant, seed, run_dir, opts, run_identity(config_file, opts, code)))
    return runs


def _read(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return f"(no log at {path})"


def _record_attempt(run: GridRun, how: str) -> None:
    _write(run.run_dir / "identity.json", run.identity)
    with open(run.run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "how": how}) + "\n")


def _differences(recorded: Optional[dict], wanted: dict) -> str:
    if not isinstance(recorded, dict):
        return "it records no identity (a folder of an earlier acm-d2 version, or not a run)"
    changed = [key for key in wanted if recorded.get(key) != wanted[key]]
    return "its " + ", ".join(f"{key} is {recorded.get(key)}, not {wanted[key]}" for key in changed)


def _set_aside(run: GridRun, recorded: Optional[dict]) -> None:
    """Move a folder of another run (another identity) to ``seed<N>.superseded-<time>``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run.run_dir.with_name(f"{run.run_dir.name}.superseded-{stamp}")
    suffix = 1
    while target.exists():
        target = run.run_dir.with_name(f"{run.run_dir.name}.superseded-{stamp}-{suffix}")
        suffix += 1
    os.rename(run.run_dir, target)
    logger.warning("%s: %s holds another run (%s): moved it to %s; training this one from scratch", run.label,
                   run.run_dir, _differences(recorded, run.identity), target)


def _result_record(run: GridRun) -> dict:
    return {"variant": run.variant, "backbone": run.backbone, "seed": run.seed, "opts": run.opts,
            "identity": run.identity}


def _fail(run: GridRun, message: str, log: Path) -> dict:
    failure = {**_result_record(run), "metrics": {}, "failed": message, "log": str(log), "log_tail": _log_tail(log)}
    _write(run.run_dir / "failed.json", failure)
    return failure


def _finish(run: GridRun, seconds: Optional[float], measure) -> dict:
    """The result of a run whose training ended: its final metrics, plus ``measure(run)``.
    RuntimeError if it has no model_final.pth or no evaluation (it did not finish)."""
    if not (run.run_dir / "model_final.pth").is_file():
        raise RuntimeError(f"{run.run_dir / 'model_final.pth'} not found: the training did not finish")
    metrics = read_final_metrics(run.run_dir)
    metrics.update(measure(run))
    result = {**_result_record(run), "metrics": metrics, "seconds": seconds}
    _write(run.run_dir / "result.json", result)
    (run.run_dir / "failed.json").unlink(missing_ok=True)
    logger.info("%s: AP box %.2f, AP mask %.2f", run.label, metrics.get("bbox/AP", float("nan")),
                metrics.get("segm/AP", float("nan")))
    return result


def _train_locally(run: GridRun, config_file: str, threads: int, measure) -> dict:
    start = time.time()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    _record_attempt(run, "local")
    log = run.run_dir / "train_net.out"
    try:
        run_train_net(config_file, ["--resume"] + run.opts, run.run_dir, threads=threads or None, log_path=log)
        return _finish(run, time.time() - start, measure)
    except RuntimeError as e:  # e.g. "Training has diverged": reported, the other runs go on
        logger.error("%s failed: %s", run.label, e)
        return _fail(run, str(e), log)


#: Where the kernel lists processes (Linux); without it a local job's liveness is its pid's.
_PROC = Path("/proc")


def _process_start_ticks(pid: int) -> Optional[int]:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat),
    or None: no such process, or no /proc."""
    try:
        stat = (_PROC / str(int(pid)) / "stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # the fields after "(name)" start at field 3
    except (OSError, ValueError, IndexError):
        return None


def _local_job_alive(job: dict) -> bool:
    """Whether the process of a local job.json exists: its pid and, where the record has it
    (``pid_start``) and /proc exists, its start time; a pid reused by another process is not it.
    A record of an earlier version (no ``pid_start``) is judged by its pid alone."""
    try:
        pid = int(job["pid"])
    except (KeyError, ValueError, TypeError):
        return False
    if job.get("pid_start") is not None and _PROC.is_dir():
        return _process_start_ticks(pid) == job["pid_start"]
    try:  # a job of an earlier call of this tool: not our child, reaped by the system
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class _StateUnknownError(RuntimeError):
    """A SLURM job's state stayed UNKNOWN longer than :data:`UNKNOWN_STATE_LIMIT_S`."""


def _job_alive(job: dict, handle, unknown_since: Optional[Dict[str, float]] = None) -> bool:
    """Whether the job of a job.json record may still train. ``handle``: submitit's Job when
    this process submitted it (its own child: ``done()`` also reaps it), else None.
    ``unknown_since``: job id -> when (``time.monotonic()``) its SLURM state was first seen
    UNKNOWN; with it, :class:`_StateUnknownError` once that lasts :data:`UNKNOWN_STATE_LIMIT_S`."""
    if handle is not None:
        if handle.done():
            return False
        if job.get("cluster") == "local":
            return True
        state = handle.state
    elif job.get("cluster") == "local":
        return _local_job_alive(job)
    else:
        from ..engine.slurm import require_submitit

        state = require_submitit().SlurmJob(job["folder"], job["job_id"]).state
    state = state.split()[0] if state else "UNKNOWN"
    if unknown_since is not None:
        if state != "UNKNOWN":
            unknown_since.pop(job["job_id"], None)
        elif time.monotonic() - unknown_since.setdefault(job["job_id"], time.monotonic()) >= UNKNOWN_STATE_LIMIT_S:
            raise _StateUnknownError(
                f"job {job['job_id']}: its SLURM state could not be read for {UNKNOWN_STATE_LIMIT_S:g} s "
                f"(sacct answers UNKNOWN: is sacct missing on this machine, or is SLURM's accounting down?); not "
                f"waited on any longer. It may still be running (see squeue): its job.json is kept, and a later "
                f"call looks at it again."
            )
    return state in _SLURM_ALIVE


def _submit(run: GridRun, config_file: str, slurm: SlurmSettings):
    from ..engine.slurm import submit_training

    run.run_dir.mkdir(parents=True, exist_ok=True)
    options = dict(slurm.options)
    if slurm.account:
        options["account"] = slurm.account
    folder = run.run_dir / "slurm"
    _record_attempt(run, slurm.cluster or "slurm")
    job = submit_training(
        str(TRAIN_NET), run.train_net_args(config_file), str(folder), nodes=slurm.nodes, gpus_per_node=slurm.gpus_per_node,
        partition=slurm.partition, time_min=slurm.time_min, cpus_per_task=slurm.cpus_per_task, slurm_options=options,
        setup=slurm.setup, name=f"acm_d2 {run.label}", cluster=slurm.cluster,
    )
    process = getattr(job, "_process", None)  # submitit's local executor: the job's process
    record = {"job_id": str(job.job_id), "folder": str(folder), "cluster": "local" if process is not None else "slurm",
              "pid": process.pid if process is not None else None,
              "pid_start": _process_start_ticks(process.pid) if process is not None else None, "opts": run.opts, "identity": run.identity,
              "submitted": time.time()}
    _write(run.run_dir / "job.json", record)
    (run.run_dir / "failed.json").unlink(missing_ok=True)
    logger.info("%s: submitted job %s", run.label, job.job_id)
    return record, job


def _job_log(job: dict) -> Path:
    return Path(job["folder"]) / f"{job['job_id']}_0_log.err"


def run_grid(runs: Sequence[GridRun], config_file: str, measure, jobs: int = 2, threads: int = 1,
             slurm: Optional[SlurmSettings] = None, retry_failed: bool = False, wait: bool = True,
             poll_s: float = 30.0) -> Dict[str, List[dict]]:
    """Bring the runs to an end: reuse the finished ones, train the others (``jobs`` local
    processes at a time, ``threads`` each; or one SLURM job each with ``slurm``), never start
    a run whose job is still alive, and retry failed runs only with ``retry_failed``.
    ``measure(run)`` adds figures to a finished run's metrics (computed once).

    Returns {"finished": [...], "failed": [...], "running": [...]} (results, failures with
    their log's last lines, and the runs whose jobs are still alive when ``wait`` is False)."""
    finished, failed, todo, alive, busy = [], [], [], [], []
    for run in runs:
        recorded = _read(run.run_dir / "identity.json")
        job = _read(run.run_dir / "job.json")
        if run.run_dir.is_dir() and any(run.run_dir.iterdir()) and recorded != run.identity:
            if job is not None and not (run.run_dir / "result.json").exists() and _job_alive(job, None):
                busy.append(f"{run.label}: job {job.get('job_id')} in {run.run_dir} ({_differences(recorded, run.identity)})")
                continue
            _set_aside(run, recorded)
            todo.append(run)
            continue
        done = _read(run.run_dir / "result.json")
        if done is not None:
            logger.info("Reusing %s", run.run_dir / "result.json")
            finished.append(done)
            continue
        failure = _read(run.run_dir / "failed.json")
        if failure is not None and not retry_failed:
            failed.append(failure)
            continue
        if slurm is not None and job is not None and failure is None:
            alive.append((run, job, None))  # submitted before: collected below, never submitted twice
            continue
        todo.append(run)
    if busy:
        raise GridInUseError("these runs have jobs still alive that train another config or code than the one asked "
                           "for; wait for them to end (or cancel them), then call again:\n" + "\n".join(busy))
    if slurm is None:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for result in pool.map(lambda run: _train_locally(run, config_file, threads, measure), todo):
                (failed if result.get("failed") else finished).append(result)
        return {"finished": finished, "failed": failed, "running": []}
    alive += [(run, *_submit(run, config_file, slurm)) for run in todo]
    unknown_since: Dict[str, float] = {}
    while alive:
        still = []
        for run, job, handle in alive:
            try:
                if _job_alive(job, handle, unknown_since):
                    still.append((run, job, handle))
                    continue
            except _StateUnknownError as e:  # reported, not recorded as failed: the job may still run
                logger.error("%s: %s", run.label, e)
                log = _job_log(job)
                failed.append({**_result_record(run), "metrics": {}, "failed": str(e), "log": str(log),
                               "log_tail": _log_tail(log)})
                continue
            try:  # the job ended: with its final evaluation, or without
                finished.append(_finish(run, time.time() - job["submitted"], measure))
            except RuntimeError as e:
                failed.append(_fail(run, f"job {job['job_id']} ended without a final evaluation ({e})", _job_log(job)))
        alive = still
        if not alive or not wait:
            break
        time.sleep(poll_s)
    return {"finished": finished, "failed": failed, "running": [{"run": r.label, "job_id": j["job_id"]} for r, j, _ in alive]}
