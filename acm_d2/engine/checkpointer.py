"""A Detectron2 checkpointer that is strict about ACM parameters, safe, and atomic.

:class:`ACMCheckpointer` is Detectron2's :class:`DetectionCheckpointer` with four changes:

* ``.pth`` files load with ``torch.load(..., weights_only=True)``: no code stored in a file
  runs. ``.pkl`` model-zoo files still go through Detectron2's own pickle reader (only those
  formats); unpickling a ``.pkl`` runs code, so use ``.pkl`` files from trusted sources only.
* A file that is neither a Detectron2/PyTorch checkpoint nor a known model-zoo format (a
  text file, a truncated ``.pth``) raises :class:`acm_d2.checkpoint.CheckpointLoadError`
  naming the file and the problem.
* A checkpoint whose ACM (or SE) parameters have other shapes than the model's raises
  :class:`ACMShapeMismatchError`, key by key, instead of Detectron2's warning and skip (a
  skipped ACM parameter would silently keep its random initialisation). Other mismatched
  keys (e.g. a box predictor for another number of classes when fine-tuning) keep
  Detectron2's behaviour. ACM parameters that are *missing* (loading ImageNet weights into
  an ACM model) are reported as missing, as Detectron2 does. Checkpoints in the layout of
  the ACM authors' fork (``<block>.module.add_mod.*``) are converted on the fly.
* ``save`` writes ``model_XXXX.pth`` / ``model_final.pth`` and ``last_checkpoint``
  atomically (a temporary file in the same folder, fsync, ``os.replace``): a kill during a
  write leaves the previous files intact, so ``--resume`` always finds a whole checkpoint.
"""
import logging
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint import CheckpointLoadError, convert_official_state_dict
from ..modeling.context_module import ResidualContextModule

__all__ = ["ACMCheckpointer", "ACMShapeMismatchError", "CheckpointLoadError", "atomic_write"]

logger = logging.getLogger(__name__)

# A key of the ACM authors' fork: "<block>.module.{add,sub,mul}_mod.*".
_AUTHORS_KEY = re.compile(r"(^|\.)module\.(add_mod|sub_mod|mul_mod)\.")


class ACMShapeMismatchError(ValueError):
    """ACM parameters of a checkpoint do not fit the model.

    ``mismatches`` is a list of (key, shape in checkpoint, shape in model).
    """

    def __init__(self, message: str, mismatches: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.mismatches = mismatches


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file so that ``path`` holds either its old content or the whole new one.

    ``write(f)`` writes into a temporary file in the folder of ``path``; the file is then
    flushed, fsynced and moved over ``path`` with ``os.replace`` (atomic on POSIX and
    Windows), and the folder is fsynced. If ``write`` raises, the temporary file is removed
    and ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_local(path: str) -> bool:
    return "://" not in path


class ACMCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with safe loading, ACM shape checks and atomic saves.

    Same arguments as :class:`DetectionCheckpointer` (model, save_dir, save_to_disk,
    checkpointables). See the module docstring for what differs.
    """

    # ---------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """As Detectron2's ``save``, but the file and ``last_checkpoint`` are written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):  # remote storage: no atomic rename; Detectron2's way
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a folder")
        self.logger.info("Saving checkpoint to %s", save_file)
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Write ``last_checkpoint`` atomically (a half-written name would break ``--resume``)."""
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if not _is_local(save_file):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def remove_stale_temp_files(self) -> None:
        """Delete the temporary files that a process killed during ``save`` left in save_dir.

        Call it only when no other process writes to save_dir (the trainer does on resume).
        """
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return
        for name in os.listdir(self.save_dir):
            if name.startswith(".") and name.endswith(".tmp") and (".pth." in name or name.startswith(".last_checkpoint.")):
                self.logger.info("Removing %s, left by an interrupted checkpoint write", name)
                try:
                    os.unlink(os.path.join(self.save_dir, name))
                except FileNotFoundError:
                    pass

    # --------------------------------------------------------------- loading
    def load(self, path, *args, **kwargs):
        if path and _is_local(path) and "?" not in path and not os.path.isfile(path):
            # Detectron2 would fail with a bare AssertionError "Checkpoint ... not found!"
            raise FileNotFoundError(
                f"Checkpoint {path} does not exist (MODEL.WEIGHTS or the file named in "
                f"{os.path.join(self.save_dir, 'last_checkpoint')})"
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            # Detectron2's reader of its model-zoo and Caffe2 .pkl formats (this unpickles).
            try:
                loaded = super()._load_file(filename)
            except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, AttributeError, TypeError, ImportError) as e:
                raise CheckpointLoadError(
                    f"{filename}: not a Detectron2 / Caffe2 model-zoo .pkl file ({type(e).__name__}: {e}). "
                    f"The file may be truncated ({os.path.getsize(filename)} bytes) or in another format."
                ) from e
            self._check_loaded(loaded, filename)
            return loaded
        loaded = super()._load_file(filename)  # .pyth and .pth; .pth goes through _torch_load
        self._check_loaded(loaded, filename)
        return loaded

    def _torch_load(self, f: str):
        """``torch.load(f, weights_only=True)`` with a clear error for unreadable files."""
        try:
            loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            if _looks_like_torch_file(f):
                raise CheckpointLoadError(
                    f"{f} cannot be loaded with torch.load(weights_only=True): it stores Python objects "
                    f"besides tensors, and unpickling them could run arbitrary code. Checkpoints written "
                    f"by acm-d2 and files converted by tools/convert_official_checkpoint.py hold tensors "
                    f"only; convert a trusted file with that tool (--trust-pickle). Details: "
                    f"{str(e).splitlines()[0]}"
                ) from e
            raise CheckpointLoadError(_unreadable_message(f, e)) from e
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
            raise CheckpointLoadError(_unreadable_message(f, e)) from e
        if not isinstance(loaded, dict):
            raise CheckpointLoadError(
                f"{f}: not a checkpoint: expected a dict of tensors or Detectron2's "
                f"{{'model': state_dict, ...}}, got {type(loaded).__name__}"
            )
        return loaded

    @staticmethod
    def _check_loaded(loaded, filename: str) -> None:
        if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict):
            raise CheckpointLoadError(
                f"{filename}: not a checkpoint: expected a dict of tensors or Detectron2's "
                f"{{'model': state_dict, ...}}, got {type(loaded).__name__}"
            )
        model = loaded["model"]
        bad = [k for k, v in model.items() if not hasattr(v, "shape")]
        if bad:
            raise CheckpointLoadError(
                f"{filename}: not a model checkpoint: {len(bad)} of {len(model)} entries are not tensors "
                f"or arrays (e.g. {bad[:3]})"
            )

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        if any(_AUTHORS_KEY.search(k) for k in state):
            self.logger.info("Converting the ACM keys of the ACM authors' layout (<block>.module.add_mod.*)")
            checkpoint["model"], _ = convert_official_state_dict(state, strict=True)
        incompatible = super()._load_model(checkpoint)
        context_prefixes = tuple(
            f"{name}." for name, module in self.model.named_modules() if isinstance(module, ResidualContextModule)
        )
        mismatched = [m for m in incompatible.incorrect_shapes if m[0].startswith(context_prefixes)]
        if mismatched:
            lines = "\n".join(
                f"  {key}: checkpoint {tuple(ckpt)} vs model {tuple(model)}" for key, ckpt, model in mismatched
            )
            message = (
                f"{len(mismatched)} ACM parameters of the checkpoint do not fit the model "
                f"(key: checkpoint shape vs model shape):\n{lines}\n"
                f"Was the checkpoint trained with other MODEL.ACM settings (GROUPS, MODULE, STAGES) or "
                f"another MODEL.RESNETS.DEPTH / RES2_OUT_CHANNELS? ACM parameters are never skipped."
            )
            self.logger.error(message)
            raise ACMShapeMismatchError(message, mismatched)
        return incompatible


def _looks_like_torch_file(path: str) -> bool:
    """torch.save's zip format, or the legacy pickle format (protocol 2+ starts with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _unreadable_message(path: str, error: BaseException) -> str:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        what = "a zip archive like torch.save's, but unreadable: probably truncated or corrupted"
    elif head[:1] == b"\x80":
        what = "a legacy pickle that cannot be read"
    else:
        what = "not a PyTorch or Detectron2 checkpoint (neither torch.save's zip format nor a model-zoo .pkl)"
    return (
        f"Cannot load checkpoint {path} ({size} bytes): {what}. "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    )
