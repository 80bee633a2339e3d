"""What ``--resume`` does with a changed config, and the checks of a checkpoint's training state.

Every checkpoint of :class:`acm_d2.engine.ResumableTrainer` stores the run's config
(``checkpoint["trainer"]["config"]``, YAML). On ``--resume``, :func:`check_resumed_config`
compares it with the new config, key by key, before anything runs or is written:

* **refused** (:class:`ResumeConfigError`, listing each key with the checkpoint's and the new
  value): every ``MODEL.*`` key except ``MODEL.WEIGHTS``, ``MODEL.DEVICE`` and the test-time
  keys (``*_TEST``, ``DETECTIONS_PER_IMAGE``): shapes, classes, ACM modules, variant, FPN
  width, losses; ``INPUT.FORMAT``; ``DATASETS.TRAIN`` (the data stream's position belongs to
  it); ``SEED`` (the checkpoint's seed would win); ``SOLVER.AMP.ENABLED`` (the training state
  differs);
* **applied** (a warning names each one): ``SOLVER.BASE_LR``, ``MOMENTUM``, ``NESTEROV``,
  ``WEIGHT_DECAY*``, ``BIAS_LR_FACTOR``: the resumed optimizer's parameter groups and the LR
  scheduler's base LRs take the new values (:func:`apply_solver_settings`), and the schedule
  keys (``LR_SCHEDULER_NAME``, ``STEPS``, ``MAX_ITER``, ``GAMMA``, ``WARMUP_*``,
  ``BASE_LR_END``, ``NUM_DECAYS``), which Detectron2 rebuilds from the new config: from the
  resumed iteration on, the LR is the new schedule's value for that iteration;
* **used as given** (a warning names them): keys that only one of the configs has (another
  version of acm-d2 or Detectron2), and everything else (``SOLVER.IMS_PER_BATCH``,
  ``DATALOADER.*``, ``INPUT.*`` augmentations, ``TEST.*``, periods, ``OUTPUT_DIR``, ...);
  batch and loader changes make the data stream differ from the uninterrupted run.

:func:`validate_trainer_state` checks the fields of a checkpoint's training state
(iteration, optimizer, scheduler, seeds) before they are used, so a corrupted or hostile
file fails at once, naming the file and the field.
"""
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.solver.lr_scheduler import LRMultiplier

__all__ = ["ResumeConfigError", "apply_solver_settings", "check_resumed_config", "validate_trainer_state"]

logger = logging.getLogger(__name__)

_ALLOWED_MODEL_KEYS = ("MODEL.WEIGHTS", "MODEL.DEVICE")
_REFUSED_KEYS = ("INPUT.FORMAT", "DATASETS.TRAIN", "SEED", "SOLVER.AMP.ENABLED")
_OPTIMIZER_KEYS = (
    "SOLVER.BASE_LR", "SOLVER.MOMENTUM", "SOLVER.NESTEROV", "SOLVER.WEIGHT_DECAY", "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_BIAS", "SOLVER.WEIGHT_DECAY_EMBED", "SOLVER.BIAS_LR_FACTOR",
)
_SCHEDULE_KEYS = (
    "SOLVER.LR_SCHEDULER_NAME", "SOLVER.STEPS", "SOLVER.MAX_ITER", "SOLVER.GAMMA", "SOLVER.WARMUP_FACTOR",
    "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_METHOD", "SOLVER.BASE_LR_END", "SOLVER.NUM_DECAYS", "SOLVER.RESCALE_INTERVAL",
)


class ResumeConfigError(ValueError):
    """``--resume`` with a config that differs from the checkpoint's in a way that breaks the run."""


def _flatten(node: Mapping, prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = _as_tuples(value)
    return flat


def _as_tuples(value):
    return tuple(map(_as_tuples, value)) if isinstance(value, (list, tuple)) else value


def _kind(key: str) -> str:
    """"refused", "applied" or "given" for a changed config key."""
    if key in _REFUSED_KEYS:
        return "refused"
    if key.startswith("MODEL."):
        last = key.rsplit(".", 1)[-1]
        if key in _ALLOWED_MODEL_KEYS or "_TEST" in last or last == "DETECTIONS_PER_IMAGE":
            return "given"
        return "refused"
    if key in _OPTIMIZER_KEYS or key in _SCHEDULE_KEYS or key.startswith("SOLVER.CLIP_GRADIENTS."):
        return "applied"
    return "given"


def config_changes(old_yaml: str, new_cfg) -> List[Tuple[str, Any, Any, str]]:
    """(key, checkpoint value, new value, kind) for every key that differs."""
    old = _flatten(CfgNode.load_cfg(old_yaml))  # yaml.safe_load; a malformed one: check_resumed_config says so
    new = _flatten(CfgNode.load_cfg(new_cfg.dump()))  # the same round trip as the stored config
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            # a key only one side has: another acm-d2 / Detectron2 version, nothing to compare
            kind = "given" if a is missing or b is missing else _kind(key)
            changes.append((key, "(no such key)" if a is missing else a, "(no such key)" if b is missing else b, kind))
    return changes


def check_resumed_config(
    old_yaml: Optional[str], new_cfg, checkpoint_file: str, log_changes: bool = True
) -> List[Tuple[str, Any, Any, str]]:
    """Compare the config stored in ``checkpoint_file`` (``old_yaml``) with ``new_cfg``; see the
    module docstring. Returns the changes; logs the applied and the given ones (``log_changes``).

    Raises:
        ResumeConfigError: a refused change; the message lists every refused key with both values.
    """
    if not isinstance(old_yaml, str):
        if log_changes:
            logger.warning(
                "%s stores no config (written before acm-d2 kept it): the new config cannot be compared with "
                "the checkpoint's; resuming with it as given", checkpoint_file,
            )
        return []
    try:
        changes = config_changes(old_yaml, new_cfg)
    except Exception as e:  # noqa: BLE001 - not YAML, not a config: a corrupted checkpoint
        from ..checkpoint import CheckpointLoadError

        raise CheckpointLoadError(
            f"{checkpoint_file}: the config stored in the checkpoint cannot be read ({type(e).__name__}: {e}); the "
            f"file is corrupted or was not written by this trainer"
        ) from e
    refused = [c for c in changes if c[3] == "refused"]
    if refused:
        lines = "\n".join(f"  {key}: checkpoint {a!r}, now {b!r}" for key, a, b, _ in refused)
        raise ResumeConfigError(
            f"--resume from {checkpoint_file}: the config differs from the one the checkpoint was trained with "
            f"in {len(refused)} setting(s) that a resumed run cannot change:\n{lines}\n"
            f"Resume with the checkpoint's values (they are in the checkpoint's config, shown above), or start "
            f"a new run in another OUTPUT_DIR (or with --overwrite) and MODEL.WEIGHTS {checkpoint_file} to "
            f"fine-tune from it. Nothing was run or written."
        )
    for key, a, b, kind in changes if log_changes else ():
        how = "applied to the resumed optimizer and LR schedule" if kind == "applied" else "used as given"
        logger.warning("--resume with a changed %s: checkpoint %r, now %r (%s)", key, a, b, how)
    return changes


def apply_solver_settings(optimizer, scheduler, configured_groups: Sequence[Mapping[str, Any]]) -> List[str]:
    """Give a resumed ``optimizer`` the hyperparameters of the new config.

    ``configured_groups``: the optimizer's param groups as built from the new config, before
    the checkpoint was loaded (without ``params``). Every hyperparameter that differs is set;
    a changed ``lr`` becomes the scheduler's base LR of the group, and the group's current LR
    is the scheduler's value at the resumed iteration. Returns what changed, for the log.
    """
    changed = []
    for i, (group, configured) in enumerate(zip(optimizer.param_groups, configured_groups)):
        for key, value in configured.items():
            if key in ("params", "initial_lr"):
                continue
            if key == "lr":
                base = scheduler.base_lrs[i] if scheduler is not None else group.get("initial_lr", group["lr"])
                if base != value:
                    changed.append(f"group {i} base lr {base} -> {value}")
                    if scheduler is not None:
                        scheduler.base_lrs[i] = value
                    else:
                        group["lr"] = value
                    group["initial_lr"] = value
            elif group.get(key) != value:
                changed.append(f"group {i} {key} {group.get(key)} -> {value}")
                group[key] = value
    if isinstance(scheduler, LRMultiplier):  # the LR of the next iteration: the (new) schedule's at this one
        try:
            lrs = scheduler.get_lr()
        except RuntimeError:  # the resumed iteration is past the (new) MAX_ITER: no iteration is left
            lrs = []
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    if changed:
        logger.warning("--resume: the new config's solver settings applied: %s", "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
    return changed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_numbers(values) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def validate_trainer_state(state, filename: str, optimizer=None) -> None:
    """Check the training state of a checkpoint (``checkpoint["trainer"]``) before it is used.

    Checks: ``iteration`` an integer >= 0; ``hooks`` and the trainer state mappings; the
    optimizer state a mapping with ``state`` and ``param_groups`` as many as ``optimizer``'s,
    each with as many parameters and finite numbers >= 0 for ``lr``, ``momentum``,
    ``weight_decay``; the LR scheduler's ``base_lrs`` finite numbers, one per group, and
    ``last_epoch`` an integer; the seeds integers in 0..2**63-1.

    Raises:
        acm_d2.checkpoint.CheckpointLoadError: naming ``filename`` and the field.
    """
    from ..checkpoint import CheckpointLoadError

    def bad(field: str, value, expected: str):
        text = repr(value)
        raise CheckpointLoadError(
            f"{filename}: the checkpoint's {field} is {text[:80]}{'...' if len(text) > 80 else ''}, expected {expected}; "
            f"the file is corrupted or was not written by this trainer. Resume from another checkpoint (write "
            f"its name into last_checkpoint) or start from MODEL.WEIGHTS."
        )

    if not isinstance(state, Mapping):
        bad("trainer state", type(state).__name__, "a dict")
    iteration = state.get("iteration")
    if not _is_int(iteration) or iteration < 0:
        bad("trainer iteration", iteration, "an integer >= 0")
    hooks = state.get("hooks", {})
    if not isinstance(hooks, Mapping):
        bad("trainer hooks state", hooks, "a dict")
    scheduler = hooks.get("LRScheduler")
    groups = len(optimizer.param_groups) if optimizer is not None else None
    if scheduler is not None:
        if not isinstance(scheduler, Mapping):
            bad("LR scheduler state", scheduler, "a dict")
        base_lrs = scheduler.get("base_lrs")
        if not _finite_numbers(base_lrs) or (groups is not None and len(base_lrs) != groups):
            bad("LR scheduler base_lrs", base_lrs, f"{groups if groups is not None else 'one per group:'} finite numbers")
        if not _is_int(scheduler.get("last_epoch")) or scheduler["last_epoch"] < -1:
            bad("LR scheduler last_epoch", scheduler.get("last_epoch"), "an integer >= -1")
    for field, seed in (("IterationSeed seed", (hooks.get("IterationSeed") or {}).get("seed", 0)),
                        ("data stream seed", (state.get("data_stream") or {}).get("seed", 0))):
        if not _is_int(seed) or not 0 <= seed < 2**63:
            bad(field, seed, "an integer in 0..2**63-1")
    inner = state.get("_trainer", {})
    if not isinstance(inner, Mapping):
        bad("trainer state '_trainer'", inner, "a dict")
    opt = inner.get("optimizer")
    if opt is None:
        return
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping) or not isinstance(opt.get("param_groups"), list):
        bad("optimizer state", type(opt).__name__, "a dict with 'state' (a dict) and 'param_groups' (a list)")
    saved = opt["param_groups"]
    if groups is not None and len(saved) != groups:
        bad("optimizer param_groups", f"{len(saved)} groups", f"{groups} (this model's and config's)")
    for i, group in enumerate(saved):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), list):
            bad(f"optimizer param group {i}", group, "a dict with 'params' (a list)")
        if optimizer is not None and len(group["params"]) != len(optimizer.param_groups[i]["params"]):
            bad(f"optimizer param group {i}", f"{len(group['params'])} parameters", f"{len(optimizer.param_groups[i]['params'])}")
        for key in ("lr", "momentum", "weight_decay"):
            if key in group and not (_finite_numbers([group[key]]) and group[key] >= 0):
                bad(f"optimizer param group {i} {key}", group[key], "a finite number >= 0")
