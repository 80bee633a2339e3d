"""Detectron2's DefaultTrainer made to survive long runs on shared clusters.

:class:`ResumableTrainer` is :class:`detectron2.engine.DefaultTrainer` with:

* :class:`~acm_d2.engine.checkpointer.SafeCheckpointer` (safe, atomic, strict on ACM shapes);
* a data stream and random augmentations that resume where an interrupted run stopped
  (:mod:`acm_d2.engine.data`), and the global generators seeded at every iteration from
  ``(seed, rank, iteration)`` (:class:`IterationSeed`), so that on CPU a resumed run ends
  with the weights of an uninterrupted one; the seed is kept in the checkpoints;
* a non-finite loss raises Detectron2's ``FloatingPointError`` on the process where it
  happened, naming the non-finite terms and whether ``loss_acm_orth`` is one of them; a
  forward pass that diverged before the losses (Detectron2's RPN: "Predicted boxes or
  scores contain Inf/NaN") raises one that names the non-finite parameters and what to change;
* ``MODEL.META_ARCHITECTURE`` and ``MODEL.BACKBONE.NAME`` must be registered names, and
  ``MODEL.ROI_HEADS.NUM_CLASSES`` / ``MODEL.RETINANET.NUM_CLASSES`` are checked against the
  categories of ``DATASETS.TRAIN`` before the model is built, and again once the datasets
  are loaded (:func:`acm_d2.data.check_num_classes`), before the first iteration;
* the categories of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` must agree by id and name
  (:func:`acm_d2.data.check_same_categories`);
* every checkpoint stores the config as given; on resume the checkpoint's training state is
  validated, a checkpoint without training state, of an iteration beyond SOLVER.MAX_ITER - 1
  or whose tensors do not fit the model is refused (:func:`acm_d2.engine.run_dir.check_resume_checkpoint`),
  a config change that would break the run is refused, and the new config's LR,
  momentum, weight decay and schedule are applied to the resumed optimizer
  (:mod:`acm_d2.engine.resume_check`); ``acm_d2.train_net`` also locks OUTPUT_DIR and checks
  all this before anything is written (:mod:`acm_d2.engine.run_dir`);
* ``model_final.pth`` exists after every completed run: a run killed while writing it is
  completed by ``resume_or_load`` (it writes the file from the last checkpoint);
* ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` "full_model" (clip the norm of all gradients together);
* DistributedDataParallel also for models on the CPU (gloo): Detectron2's
  ``create_ddp_model`` passes ``device_ids``, which DDP refuses for CPU modules, and
  ``DefaultTrainer.__init__`` calls it directly, so ``__init__`` is restated here.
"""
import logging
import re
import math
import os
import weakref
from typing import Mapping, Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from ..config import check_periods, check_registered_names
from ..data.coco_format import check_num_classes, check_same_categories
from ..modeling.orth_loss import LOSS_KEY
from .checkpointer import SafeCheckpointer
from .data import build_resumable_train_loader, derived_seed, seed_all_generators
from .preemption import CheckpointOnStop
from .resume_check import apply_solver_settings, check_resumed_config, validate_trainer_state
from .run_dir import check_resume_checkpoint

__all__ = [
    "CheckedAMPTrainer",
    "CheckedSimpleTrainer",
    "ResumableTrainer",
    "IterationSeed",
    "check_distributed_setup",
    "create_ddp_model_any_device",
    "diverged_forward_message",
    "non_finite_loss_message",
]

logger = logging.getLogger(__name__)


def non_finite_loss_message(loss_dict: Mapping[str, float], iteration: int, where: str = "") -> str:
    """Detectron2's "Loss became infinite or NaN" message, plus which terms are non-finite."""
    values = {k: float(v) for k, v in loss_dict.items()}
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    message = f"Loss became infinite or NaN at iteration={iteration}{where}!\nloss_dict = {values}\n"
    message += f"Non-finite terms: {bad}.\n"
    if LOSS_KEY in bad:
        message += (
            f"{LOSS_KEY} (the ACM orthogonality loss, lambda = MODEL.ACM.ORTH_LOSS_WEIGHT) is non-finite"
            + (" and so are Detectron2's own terms" if len(bad) > 1 else ", the other terms are finite")
            + ": the ACM features (K, Q) overflowed; lower SOLVER.BASE_LR or MODEL.ACM.ORTH_LOSS_WEIGHT, "
            "raise SOLVER.WARMUP_ITERS, or check the input data."
        )
    elif LOSS_KEY in values:
        message += (
            f"{LOSS_KEY} (the ACM orthogonality loss) is finite ({values[LOSS_KEY]}); the non-finite "
            f"terms come from the detector: lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS, or check the "
            f"boxes and masks of the data."
        )
    else:
        message += f"{LOSS_KEY} is not in the loss dict (no ACM orthogonality loss in this model)."
    return message


# The message of Detectron2's find_top_rpn_proposals when the RPN predicts non-finite values.
_RPN_DIVERGED = "Predicted boxes or scores contain Inf/NaN"


def diverged_forward_message(
    model: torch.nn.Module, iteration: int, error: str, last_losses: Optional[Mapping[str, float]] = None
) -> str:
    """The message for a forward pass that raised ``error`` (Detectron2's "Predicted boxes or
    scores contain Inf/NaN") at ``iteration``: which parameters are non-finite, the loss terms
    of the last iteration that logged them (``last_losses``, the largest first), what to change."""
    params = list(model.named_parameters())
    bad = [name for name, p in params if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        acm = [name for name in bad if re.search(r"(^|\.)context(_after)?\.", name)]
        found = (
            f"{len(bad)} of {len(params)} parameter tensors are non-finite (e.g. {bad[:5]})"
            + (f", {len(acm)} of them in context modules" if acm else ", none in context modules")
            + ": the last optimizer step diverged."
        )
    else:
        found = (
            "Every parameter is finite: the activations overflowed in this forward pass (large "
            "weights or inputs)."
        )
    if last_losses:
        terms = sorted(last_losses.items(), key=lambda kv: -abs(kv[1]) if math.isfinite(kv[1]) else -math.inf)
        found += "\nLoss terms of the last logged iteration, the largest first: " + ", ".join(
            f"{k}={v:.4g}" for k, v in terms
        )
    return (
        f"Training diverged at iteration={iteration}: the RPN predicted non-finite boxes or "
        f"objectness scores, so the losses could not be computed (Detectron2: {error.strip()!r}).\n"
        f"{found}\n"
        f"Lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS, or enable gradient clipping "
        f"(SOLVER.CLIP_GRADIENTS.ENABLED True, e.g. CLIP_TYPE 'full_model', CLIP_VALUE 1.0); check "
        f"the boxes of the data; then resume from the last checkpoint (--resume)."
    )


def _logged_losses() -> dict:
    """The latest loss terms in the current EventStorage (empty outside training)."""
    try:
        latest = get_event_storage().latest()
    except AssertionError:  # no EventStorage
        return {}
    return {k: float(v) for k, (v, _) in latest.items() if k.startswith("loss_") or k == "total_loss"}


class _NamedNonFiniteLossMixin:
    """Check this process's losses before Detectron2 gathers them; raise with the names. A
    forward pass that diverged inside the RPN is reported with the non-finite parameters."""

    def run_step(self) -> None:
        try:
            super().run_step()
        except FloatingPointError as e:
            if _RPN_DIVERGED not in str(e):
                raise
            message = diverged_forward_message(self.model, self.iter, str(e), _logged_losses())
            logger.error(message)
            raise FloatingPointError(message) from e

    def _write_metrics(self, loss_dict, data_time: float, prefix: str = "", iter: Optional[int] = None) -> None:
        iter = self.iter if iter is None else iter
        if (iter + 1) % self.gather_metric_period == 0 and loss_dict:
            terms = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
            if not bool(torch.isfinite(terms).all()):  # one device sync, as Detectron2's .item()s
                values = {k: v.detach().float().cpu().item() for k, v in loss_dict.items()}
                where = f" on rank {comm.get_rank()}" if comm.get_world_size() > 1 else ""
                message = non_finite_loss_message(values, iter, where)
                logger.error(message)
                raise FloatingPointError(message)
        try:
            super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)
        except FloatingPointError as e:  # every term of this rank is finite, their average sum is not
            raise FloatingPointError(
                f"{e}\nEvery term is finite on this rank; the sum of the terms averaged over the ranks "
                f"is not (a term overflowed, or another rank's term is non-finite)."
            ) from e


class CheckedSimpleTrainer(_NamedNonFiniteLossMixin, SimpleTrainer):
    """:class:`SimpleTrainer` whose non-finite-loss error names the non-finite terms."""


class CheckedAMPTrainer(_NamedNonFiniteLossMixin, AMPTrainer):
    """:class:`AMPTrainer` whose non-finite-loss error names the non-finite terms."""


class IterationSeed(hooks.HookBase):
    """Before every iteration, seed Python's, NumPy's and torch's generators from
    ``(seed, rank, iteration)``: random choices in the model (proposal sampling, ...) and in
    a mapper run in the main process then do not depend on where training (re)started."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        seed_all_generators(derived_seed(self.seed, comm.get_rank(), self.trainer.iter, 2))

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])


def create_ddp_model_any_device(model, **kwargs):
    """Detectron2's ``create_ddp_model``; for a model on the CPU (gloo) without ``device_ids``."""
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        device = next(model.parameters()).device
        if device.type != "cuda":
            kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def check_distributed_setup(model) -> None:
    """Raise a clear error for models DistributedDataParallel cannot run here.

    ``torch.nn.SyncBatchNorm`` (norm "SyncBN" in Detectron2) only runs on CUDA; on the CPU
    (gloo), "naiveSyncBN" (Detectron2's NaiveSyncBatchNorm) synchronises the statistics.
    """
    if comm.get_world_size() <= 1:
        return
    device = next(model.parameters()).device
    sync = [n for n, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    if sync and device.type != "cuda":
        raise ValueError(
            f"The model has {len(sync)} torch.nn.SyncBatchNorm layers (norm 'SyncBN', e.g. {sync[0]}), "
            f"which need CUDA, but it runs on {device} with {comm.get_world_size()} processes. On the CPU "
            f"use norm 'naiveSyncBN' (MODEL.RESNETS.NORM, MODEL.FPN.NORM, ...: Detectron2's "
            f"NaiveSyncBatchNorm, which works with gloo), or 'BN' / 'FrozenBN'."
        )


_CLIP_TYPES = ("value", "norm", "full_model")


def _with_full_model_clipping(optimizer_type, clip_value: float, norm_type: float):
    """A subclass of ``optimizer_type`` whose ``step`` first clips the norm of all gradients."""

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)
        return optimizer_type.step(self, closure)

    return type(optimizer_type.__name__ + "WithFullModelGradientClip", (optimizer_type,), {"step": step})


def _thing_classes(dataset_name: str):
    """The thing_classes of a dataset's metadata, None if it has none (yet)."""
    if dataset_name not in MetadataCatalog.list():
        return None
    return MetadataCatalog.get(dataset_name).get("thing_classes")


class ResumableTrainer(DefaultTrainer):
    """DefaultTrainer with safe/atomic checkpoints, exact resume, named non-finite losses and
    CPU-capable DistributedDataParallel (see the module docstring). Use it like
    DefaultTrainer: subclass it for ``build_evaluator``, then ``resume_or_load`` and ``train``.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger not called
            setup_logger()
        # The config as given (before the scaling below): stored in the checkpoints, compared on --resume.
        self._given_cfg = cfg.clone()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        check_registered_names(cfg)  # also for configs not made by acm_d2.get_acm_cfg
        check_periods(cfg)
        check_num_classes(cfg)
        check_same_categories(cfg)  # train and test datasets: the same ids and names
        unchecked = [n for n in cfg.DATASETS.TRAIN if _thing_classes(n) is None]
        # Built in DefaultTrainer's order.
        model = self.build_model(cfg)
        check_distributed_setup(model)
        optimizer = self.build_optimizer(cfg, model)
        # The solver settings of this config, applied to a resumed optimizer (resume_or_load).
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self._resume_seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        data_loader = self.build_train_loader(cfg)
        # Loading the datasets sets the thing_classes of those registered without them
        # (Detectron2's register_coco_instances(name, {}, ...)): check those now.
        if unchecked:
            check_num_classes(cfg, unchecked)
            check_same_categories(cfg)
        # The resumable stream of build_train_loader (None if a subclass builds another).
        self._train_sampler = getattr(data_loader, "resumable_sampler", None)
        self._train_dataset = getattr(data_loader, "resumable_dataset", None)

        model = create_ddp_model_any_device(model, broadcast_buffers=False)
        self._trainer = (CheckedAMPTrainer if cfg.SOLVER.AMP.ENABLED else CheckedSimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's optimizer; SOLVER.CLIP_GRADIENTS.CLIP_TYPE may also be "full_model":
        the norm of all gradients together is clipped to CLIP_VALUE (as Detectron2's DETR and
        Mask2Former projects do), besides Detectron2's per-parameter "value" and "norm"."""
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE not in _CLIP_TYPES:
            raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {list(_CLIP_TYPES)}, got {clip.CLIP_TYPE!r}")
        if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
            return super().build_optimizer(cfg, model)
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(unclipped, model)
        optimizer.__class__ = _with_full_model_clipping(type(optimizer), clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader over a resumable stream (for SAMPLER_TRAIN "TrainingSampler";
        other samplers: Detectron2's loader, whose data order restarts on resume)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                "DATALOADER.SAMPLER_TRAIN=%s: the data order of a resumed run restarts "
                "(only TrainingSampler's stream resumes)",
                cfg.DATALOADER.SAMPLER_TRAIN,
            )
            return super().build_train_loader(cfg)
        seed = cfg.SEED if cfg.SEED >= 0 else None
        loader, sampler, dataset = build_resumable_train_loader(cfg, seed=seed)
        loader.resumable_sampler = sampler
        loader.resumable_dataset = dataset
        return loader

    def build_hooks(self):
        """DefaultTrainer's hooks, after :class:`IterationSeed` and before :class:`CheckpointOnStop`."""
        return [IterationSeed(self._resume_seed)] + super().build_hooks() + [CheckpointOnStop()]

    def resume_or_load(self, resume=True):
        """DefaultTrainer's, plus: the data stream continues at ``start_iter``, the temporary
        files of a checkpoint write that was interrupted are removed, and if the run had
        finished its iterations but was killed while writing ``model_final.pth`` (then
        ``last_checkpoint`` names the checkpoint of the last iteration), that file is written
        now, so every completed run has one."""
        if resume:
            self.checkpointer.remove_stale_temp_files()
            if self.checkpointer.has_checkpoint():  # (also when prepare_output_dir did not run)
                check_resume_checkpoint(
                    self._given_cfg, self.checkpointer.get_checkpoint_file(), self.checkpointer.model, log_changes=False
                )
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            apply_solver_settings(self._trainer.optimizer, self.scheduler, self._configured_groups)
        if self._train_sampler is not None:
            if self.start_iter < self.max_iter:  # (after the end there is nothing to replay)
                self._train_sampler.resume(self.start_iter, self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
        elif self.start_iter > 0:
            logger.warning("The train loader is not resumable: the data order restarts at iteration %d", self.start_iter)
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if resume and self.start_iter >= self.max_iter and not os.path.isfile(final):
            logger.warning(
                "All %d iterations were done but %s is missing (the run was interrupted while writing "
                "it): writing it from the checkpoint of iteration %d",
                self.max_iter, final, self.start_iter - 1,
            )
            self.checkpointer.save("model_final", iteration=self.start_iter - 1)

    def state_dict(self):
        ret = super().state_dict()
        ret["config"] = self._given_cfg.dump()  # compared with the config of a --resume (resume_check)
        if self._train_sampler is not None:
            ret["data_stream"] = {"seed": self._train_sampler.seed}
        return ret

    def load_state_dict(self, state_dict):
        # The fields are checked before use, and a refused config change stops here, before any
        # iteration, also when prepare_output_dir did not run (ResumableTrainer used directly).
        source = self.checkpointer.get_checkpoint_file() or self.cfg.OUTPUT_DIR
        validate_trainer_state(state_dict, source, self._trainer.optimizer)
        check_resumed_config(state_dict.get("config"), self._given_cfg, source, log_changes=False)
        super().load_state_dict(state_dict)
        stream = state_dict.get("data_stream")
        if stream is not None and self._train_sampler is not None:
            self._train_sampler.seed = stream["seed"]
            self._train_dataset.seed = stream["seed"]
