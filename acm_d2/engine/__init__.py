"""Training machinery for long runs: safe and atomic checkpoints, exact resume, clear
errors for non-finite losses, and distributed training also on the CPU (see
docs/training.md)."""
from .checkpointer import SafeCheckpointer, ACMShapeMismatchError, CheckpointLoadError, atomic_write
from .data import ResumableTrainingSampler, SeededMapDataset, build_resumable_train_loader
from .launcher import launch
from .trainer import (
    CheckedAMPTrainer,
    CheckedSimpleTrainer,
    ResumableTrainer,
    IterationSeed,
    check_distributed_setup,
    create_ddp_model_any_device,
    non_finite_loss_message,
)

__all__ = [
    "CheckedAMPTrainer",
    "SafeCheckpointer",
    "ACMShapeMismatchError",
    "CheckedSimpleTrainer",
    "ResumableTrainer",
    "CheckpointLoadError",
    "IterationSeed",
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "atomic_write",
    "build_resumable_train_loader",
    "check_distributed_setup",
    "create_ddp_model_any_device",
    "launch",
    "non_finite_loss_message",
]
