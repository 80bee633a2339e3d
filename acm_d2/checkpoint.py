"""Reading checkpoint files without running code stored in them.

Model-zoo ``.pkl`` files are read by :func:`load_model_zoo_pickle`, an unpickler that admits
only numpy arrays and scalars, dicts, lists, numbers and strings.

:func:`safe_torch_load` is the one function through which every ``.pth`` (and any other
non-``.pkl``) file is read, by :class:`acm_d2.engine.SafeCheckpointer` (and so
``tools/train_net.py`` and every tool) and by :func:`load_checkpoint_file`: it uses
``torch.load(..., weights_only=True)`` and refuses files that store other Python objects.
The authors' key layout is converted elsewhere, by the models while they load
(:mod:`acm_d2.authors_layout`).
"""
import io
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Mapping

import torch

__all__ = [
    "CheckpointLoadError",
    "UnsafeCheckpointError",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_model_zoo_pickle",
    "safe_torch_load",
]

logger = logging.getLogger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read safely (or at all)."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A torch file that stores Python objects besides tensors: loading it would unpickle them,
    which can run code, so :func:`safe_torch_load` refuses it."""


def extract_state_dict(checkpoint, source: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """The model state dict of a loaded checkpoint: ``checkpoint["model"]`` for Detectron2's
    files (``{"model": ..., "__author__": ..., "iteration": ...}``), else the dict itself if
    it maps names to tensors. Raises :class:`CheckpointLoadError` otherwise."""
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise CheckpointLoadError(f"{source}: expected a state dict or {{'model': state_dict, ...}}, got {type(checkpoint).__name__}")
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointLoadError(
            f"{source}: the state dict has {len(not_tensors)} entries that are not tensors "
            f"(e.g. {not_tensors[:3]}); expected a Detectron2 .pth model file"
        )
    return OrderedDict(checkpoint.items())


def load_checkpoint_file(path: str, trust_pickle: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """Read the model state dict of a ``.pth`` checkpoint (Detectron2's ``{"model": ...}``
    format or a bare state dict) with :func:`safe_torch_load`.

    A file that ``weights_only`` refuses (it pickles arbitrary Python objects, e.g. the LR
    scheduler of a training checkpoint) raises :class:`UnsafeCheckpointError` saying so; pass
    ``trust_pickle=True`` only for a file from a source you trust, which then loads with
    ``weights_only=False`` (that runs code stored in the file). Detectron2 model-zoo
    ``.pkl`` files are refused: load those with :class:`acm_d2.engine.SafeCheckpointer`
    (Detectron2's ``DetectionCheckpointer``), which knows their formats.
    """
    if str(path).endswith(".pkl"):
        message = (
            f"{path}: .pkl files (Detectron2 / Caffe2 model zoo) are pickles with their own formats; "
            f"load them with acm_d2.engine.SafeCheckpointer(model).load(path) (Detectron2's "
            f"DetectionCheckpointer), not here"
        )
        logger.error(message)
        raise CheckpointLoadError(message)
    try:
        checkpoint = safe_torch_load(path)
    except UnsafeCheckpointError:
        if not trust_pickle:
            raise
        logger.warning("%s: loading with weights_only=False (trust_pickle=True): the file may run code", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return extract_state_dict(checkpoint, source=str(path))


# torch >= 2.6 lets this variable turn weights_only off where a call does not pass it.
_FORCE_UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class _WeightsOnlyProbe:
    """A harmless class: ``torch.load(weights_only=True)`` must refuse a pickle of it."""


def _weights_only_is_enforced() -> bool:
    """Whether ``torch.load(..., weights_only=True)`` refuses a pickled object here and now
    (an environment variable or an old torch could turn the check off)."""
    buffer = io.BytesIO()
    torch.save(_WeightsOnlyProbe(), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return True
    return False


def safe_torch_load(path: str, mmap: bool = False):
    """``torch.load(path, map_location="cpu", weights_only=True)``: how acm-d2 reads every
    checkpoint that is not a ``.pkl`` (``.pth``, ``.pyth``, any other name). Loading cannot
    run code stored in the file. ``mmap=True`` maps the tensors instead of reading them (for
    a look at a checkpoint's other fields).

    Raises:
        CheckpointLoadError: the file does not exist, is not a torch file (a text or HTML
            file), or is truncated or corrupted; the message names the file and its size.
            Also when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set and this version of torch
            lets it override ``weights_only=True`` (checked by loading a harmless probe).
        UnsafeCheckpointError: the file stores Python objects besides tensors.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointLoadError(f"{path}: no such file")
    if os.environ.get(_FORCE_UNSAFE_ENV, "0").lower() in ("1", "y", "yes", "true") and not _weights_only_is_enforced():
        message = (
            f"Refusing to load {path}: {_FORCE_UNSAFE_ENV} is set and this torch ({torch.__version__}) "
            f"then ignores weights_only=True, so loading could run code stored in the file. Unset "
            f"{_FORCE_UNSAFE_ENV} (acm-d2 never needs it)."
        )
        logger.error(message)
        raise CheckpointLoadError(message)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if _looks_like_torch_file(path):
            message = (
                f"{path} cannot be loaded with torch.load(weights_only=True): it stores Python objects "
                f"besides tensors, and unpickling them could run arbitrary code. Checkpoints written "
                f"by acm-d2 and files converted by tools/convert_official_checkpoint.py hold tensors "
                f"only; if the file comes from a source you trust, convert it with "
                f"tools/convert_official_checkpoint.py IN.pth OUT.pth --trust-pickle. "
                f"Details: {_first_line(e)}"
            )
            logger.error(message)
            raise UnsafeCheckpointError(message) from e
        raise CheckpointLoadError(_unreadable_message(path, e)) from e
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
        raise CheckpointLoadError(_unreadable_message(path, e)) from e


# What Detectron2's and Caffe2's model-zoo .pkl files hold: dicts, lists, numbers, strings and
# numpy arrays and scalars. A pickle names every class or function it calls; only these load.
_MODEL_ZOO_GLOBALS = frozenset(
    [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (numpy 1)
        ("numpy._core.multiarray", "_reconstruct"),  # (numpy 2)
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol 2 pickles
        ("collections", "OrderedDict"),
    ]
)


class _ModelZooUnpickler(pickle.Unpickler):
    """An unpickler that builds only what model-zoo weight files contain (see
    :data:`_MODEL_ZOO_GLOBALS`); any other class or function is refused, never called."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # Caffe2's files are Python 2 pickles
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _MODEL_ZOO_GLOBALS:
            message = (
                f"Refusing to load {self.source}: the pickle wants to load {module}.{name}, which a Detectron2 / "
                f"Caffe2 model-zoo .pkl never holds (only numpy arrays, dicts, lists, numbers, strings); "
                f"unpickling it could run code. Use weights from Detectron2's model zoo or a .pth file; if "
                f"the file was downloaded (iopath caches downloads under ~/.torch/iopath_cache by URL "
                f"path), delete the cached copy."
            )
            logger.error(message)
            raise UnsafeCheckpointError(message)
        if module.startswith("numpy._core"):  # a numpy 2 pickle read with numpy 1
            try:
                return super().find_class(module, name)
            except ImportError:
                module = "numpy.core" + module[len("numpy._core"):]
        return super().find_class(module, name)


def load_model_zoo_pickle(file, source: str):
    """Unpickle a model-zoo ``.pkl`` from the open binary ``file`` without running code.

    Raises:
        UnsafeCheckpointError: the pickle names anything but the numpy and builtin types of
            :data:`_MODEL_ZOO_GLOBALS`; the message names ``source`` and the class.
        CheckpointLoadError: it is not a pickle, or is truncated.
    """
    try:
        return _ModelZooUnpickler(file, source).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, AttributeError, TypeError, ValueError, ImportError, IndexError, KeyError) as e:
        raise CheckpointLoadError(
            f"{source}: not a Detectron2 / Caffe2 model-zoo .pkl file ({type(e).__name__}: {e}); it may be "
            f"truncated or in another format"
        ) from e


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def _looks_like_torch_file(path: str) -> bool:
    """torch.save's zip format, or the legacy pickle format (protocol 2+ starts with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _unreadable_message(path: str, error: BaseException) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        what = "a zip archive like torch.save's, but unreadable: probably truncated or corrupted"
    elif head[:1] == b"\x80":
        what = "a legacy pickle that cannot be read"
    else:
        what = "not a PyTorch or Detectron2 checkpoint (neither torch.save's zip format nor a model-zoo .pkl)"
    return f"Cannot load checkpoint {path} ({size} bytes): {what}. ({type(error).__name__}: {_first_line(error)})"
