"""Training machinery for long runs, nothing in it specific to ACM: safe and atomic
checkpoints, exact resume, clear errors for non-finite losses, distributed training also on
the CPU, torchrun and SLURM (see docs/training.md, docs/clusters.md, docs/safety.md)."""
from .checkpointer import ACMShapeMismatchError, CheckpointLoadError, CheckpointSaveError, SafeCheckpointer, atomic_write
from .data import ResumableTrainingSampler, SeededMapDataset, build_resumable_train_loader
from .launcher import external_launcher_environment, launch
from .preemption import CheckpointOnStop, TrainingInterrupted, request_stop_on
from .resume_check import ResumeConfigError
from .run_dir import OutputDirInUseError, OutputDirNotEmptyError, check_resume_checkpoint, prepare_output_dir
from .trainer import (
    CheckedAMPTrainer,
    CheckedSimpleTrainer,
    IterationSeed,
    ResumableTrainer,
    check_distributed_setup,
    create_ddp_model_any_device,
    diverged_forward_message,
    non_finite_loss_message,
)

__all__ = [
    "ACMShapeMismatchError",
    "CheckedAMPTrainer",
    "CheckedSimpleTrainer",
    "CheckpointLoadError",
    "CheckpointOnStop",
    "CheckpointSaveError",
    "IterationSeed",
    "ResumableTrainer",
    "ResumableTrainingSampler",
    "SafeCheckpointer",
    "SeededMapDataset",
    "TrainingInterrupted",
    "atomic_write",
    "build_resumable_train_loader",
    "check_distributed_setup",
    "create_ddp_model_any_device",
    "diverged_forward_message",
    "external_launcher_environment",
    "launch",
    "non_finite_loss_message",
    "OutputDirInUseError",
    "OutputDirNotEmptyError",
    "ResumeConfigError",
    "prepare_output_dir",
    "check_resume_checkpoint",
    "request_stop_on",
]
