"""A Detectron2 checkpointer that is strict about ACM parameters, safe, and atomic.

:class:`SafeCheckpointer` is Detectron2's :class:`DetectionCheckpointer` with these changes:

* every file that is not a ``.pkl`` (``.pth``, ``.pyth``, any other name) loads with
  :func:`acm_d2.checkpoint.safe_torch_load` (``torch.load(..., weights_only=True)``): no
  code stored in a file runs, also with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set. ``.pkl``
  model-zoo files (``MODEL.WEIGHTS``, ``load(path)``, downloaded or from iopath's cache) are
  read by :func:`acm_d2.checkpoint.load_model_zoo_pickle`, which admits only numpy arrays,
  dicts, lists, numbers and strings, then interpreted as Detectron2's and Caffe2's formats.
* ``--resume`` (``resume_or_load(..., resume=True)``) loads only what ``last_checkpoint``
  names if that is the plain file name of a ``.pth`` file in ``save_dir``; anything else (a
  path, a ``.pkl``) raises :class:`acm_d2.checkpoint.CheckpointLoadError`.
* A file that is neither a Detectron2/PyTorch checkpoint nor a known model-zoo format (a
  text file, a truncated ``.pth``) raises :class:`acm_d2.checkpoint.CheckpointLoadError`
  naming the file and the problem.
* A checkpoint whose ACM (or SE) parameters have other shapes than the model's raises
  :class:`ACMShapeMismatchError`, key by key, instead of Detectron2's warning and skip (a
  skipped ACM parameter would silently keep its random initialisation). Other mismatched
  keys (e.g. a box predictor for another number of classes when fine-tuning) keep
  Detectron2's behaviour. ACM parameters that are *missing* (loading ImageNet weights into
  an ACM model) are reported as missing, as Detectron2 does. (Checkpoints in the layout of
  the ACM authors' fork are converted by the model itself while it loads.)
* A checkpoint whose context-module keys belong to another module (SE's
  ``...context.fc1.weight`` loaded into an ACM model, any into a model with MODEL.ACM.MODULE
  "none") raises :class:`acm_d2.checkpoint.CheckpointLoadError` naming the module they came
  from: they would be dropped, and the model's context modules keep their initialisation.
* A checkpoint none of whose keys fit the model is refused; with ``require_complete=True``
  (``tools/train_net.py --eval-only``) so is one that leaves any parameter or buffer of the
  model at its random initialisation (e.g. ImageNet weights, a head of another size).
* ``save`` writes ``model_XXXX.pth`` / ``model_final.pth`` and ``last_checkpoint``
  atomically (a temporary file in the same folder, fsync, ``os.replace``): a kill during a
  write leaves the previous files intact, so ``--resume`` always finds a whole checkpoint.
  A full disk raises :class:`CheckpointSaveError`, which says so, names the file and the
  space it needed.
"""
import errno
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import CNNBlockBase

from ..checkpoint import CheckpointLoadError, load_model_zoo_pickle, safe_torch_load
from ..modeling import ACM, CONTEXT_MODULE_REGISTRY, SqueezeExcitation, context_modules

__all__ = ["SafeCheckpointer", "ACMShapeMismatchError", "CheckpointLoadError", "CheckpointSaveError", "atomic_write"]

logger = logging.getLogger(__name__)

# A key of the ACM authors' fork: "<block>.module.{add,sub,mul}_mod.*".


class ACMShapeMismatchError(ValueError):
    """ACM parameters of a checkpoint do not fit the model.

    ``mismatches`` is a list of (key, shape in checkpoint, shape in model).
    """

    def __init__(self, message: str, mismatches: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.mismatches = mismatches


class CheckpointSaveError(OSError):
    """A checkpoint could not be written because the disk (or quota) is full; the previous
    checkpoints and ``last_checkpoint`` are intact. ``errno`` is the OS error's."""


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


class SafeCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with safe loading, ACM shape checks and atomic saves.

    Same arguments as :class:`DetectionCheckpointer` (model, save_dir, save_to_disk,
    checkpointables), plus ``require_complete``: if True, loading raises
    :class:`CheckpointLoadError` unless every parameter and buffer of the model comes from
    the checkpoint (for evaluation: a parameter left at its random initialisation, e.g. the
    heads when MODEL.WEIGHTS names ImageNet weights, would make the results meaningless).
    See the module docstring for what else differs.
    """

    def __init__(self, model, save_dir: str = "", *, require_complete: bool = False, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.require_complete = require_complete

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
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)
        except (OSError, RuntimeError) as e:  # torch.save turns a full disk into a RuntimeError
            code = _disk_full_errno(e)
            if code is None:
                raise
            message = self._disk_full_message(save_file, _storage_nbytes(data))
            self.logger.error(message)
            raise CheckpointSaveError(code, message) from e

    def _disk_full_message(self, save_file: str, needed: int) -> str:
        free = shutil.disk_usage(self.save_dir).free
        try:
            last = self.get_checkpoint_file()
        except CheckpointLoadError:
            last = ""
        kept = (
            f"the previous checkpoint {os.path.basename(last)} is intact and last_checkpoint still names it"
            if last and os.path.isfile(last)
            else "no earlier checkpoint was touched"
        )
        return (
            f"Disk full: no space left on the device of {self.save_dir} to write the checkpoint "
            f"{save_file} (it needs about {_mib(needed)}; {_mib(free)} are free there). Nothing was "
            f"lost: the partial file was removed and {kept}. Free some space (e.g. delete old "
            f"model_*.pth files) or set OUTPUT_DIR to a disk with room (copy the checkpoints and "
            f"last_checkpoint over), then run the same command with --resume."
        )

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
    def get_checkpoint_file(self) -> str:
        """The checkpoint named in ``save_dir/last_checkpoint`` ("" if there is none).

        Raises :class:`CheckpointLoadError` unless the name is the plain file name of a
        ``.pth`` file in ``save_dir``: ``--resume`` never follows it to another folder or to
        a ``.pkl`` (which would be unpickled).
        """
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with self.path_manager.open(save_file, "r") as f:
                name = f.read().strip()
        except OSError:  # deleted in between: as Detectron2, no checkpoint
            return ""
        plain = name and name not in (".", "..") and "/" not in name and "\\" not in name and os.sep not in name
        if not (plain and name.endswith(".pth")):
            found = sorted(n for n in os.listdir(self.save_dir) if n.endswith(".pth")) if _is_local(self.save_dir) else []
            message = (
                f"{save_file} names {name!r}, which is not the file name of a .pth checkpoint in "
                f"{self.save_dir}: --resume loads only checkpoints that training wrote into OUTPUT_DIR "
                f"(model_XXXXXXX.pth, model_final.pth), never a path elsewhere or a .pkl (unpickling "
                f"runs code). Write the name of one of them into last_checkpoint "
                f"(found: {found[-5:] or 'none'}), or delete last_checkpoint to start from MODEL.WEIGHTS."
            )
            self.logger.error(message)
            raise CheckpointLoadError(message)
        return os.path.join(self.save_dir, name)

    def load(self, path, *args, **kwargs):
        if path and _is_local(path) and "?" not in path and not os.path.isfile(path):
            # Detectron2 would fail with a bare AssertionError "Checkpoint ... not found!"
            raise FileNotFoundError(
                f"Checkpoint {path} does not exist (MODEL.WEIGHTS or the file named in "
                f"{os.path.join(self.save_dir, 'last_checkpoint')})"
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):  # Detectron2's and Caffe2's model-zoo formats, unpickled safely
            with self.path_manager.open(filename, "rb") as f:
                data = load_model_zoo_pickle(f, filename)
            if not isinstance(data, dict):
                raise CheckpointLoadError(f"{filename}: a model-zoo .pkl holds a dict, this one a {type(data).__name__}")
            if "model" in data and "__author__" in data:  # Detectron2's model zoo
                self.logger.info("Reading a file from '%s'", data["__author__"])
                loaded = data
            else:  # Caffe2 / Detectron1: a dict of blobs (detection models: under "blobs")
                blobs = data.get("blobs", data)
                if not isinstance(blobs, dict):
                    raise CheckpointLoadError(f"{filename}: the Caffe2 blobs are a {type(blobs).__name__}, not a dict")
                model = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
                loaded = {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
        elif filename.endswith(".pyth"):  # pycls checkpoints, read as Detectron2 does but safely
            loaded = safe_torch_load(filename)
            if not isinstance(loaded, dict) or not isinstance(loaded.get("model_state"), dict):
                raise CheckpointLoadError(
                    f"{filename}: a .pyth file is read as a pycls checkpoint, which holds a dict with "
                    f"'model_state'; this file has {type(loaded).__name__}"
                    + (f" with keys {sorted(map(str, loaded))[:5]}" if isinstance(loaded, dict) else "")
                )
            state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
            loaded = {"model": state, "__author__": "pycls", "matching_heuristics": True}
        else:
            loaded = super()._load_file(filename)  # calls _torch_load
        self._check_loaded(loaded, filename)
        return loaded

    def _torch_load(self, f: str):
        """:func:`acm_d2.checkpoint.safe_torch_load`, and the result must be a dict."""
        loaded = safe_torch_load(f)
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
        # The model converts checkpoints in the ACM authors' layout itself while it loads.
        checkpoint_keys = list(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        # (fvcore leaves BN's num_batches_tracked out of the missing keys)
        model_keys = [k for k in self.model.state_dict() if not k.endswith("num_batches_tracked")]
        if model_keys and not set(model_keys) - set(incompatible.missing_keys):
            message = (
                f"None of the {len(model_keys)} parameters and buffers of the model was found in the checkpoint "
                f"({len(checkpoint_keys)} entries, e.g. {checkpoint_keys[:3]}): it is the checkpoint of "
                f"another model; check MODEL.WEIGHTS and the config it was trained with"
            )
            self.logger.error(message)
            raise CheckpointLoadError(message)
        self._check_context_keys(incompatible.unexpected_keys)
        context_prefixes = tuple(
            f"{name}." for name, module in self.model.named_modules() if isinstance(module, (ACM, SqueezeExcitation))
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
        missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
        if self.require_complete and missing:
            shapes = {k for k, _, _ in incompatible.incorrect_shapes}
            message = (
                f"{len(missing)} of the {len(model_keys)} parameters and buffers of the model are not in the "
                f"checkpoint{' or have other shapes' if shapes & set(missing) else ''} (e.g. {missing[:5]}), so "
                f"they would keep their random initialisation; evaluation needs a checkpoint of this model "
                f"trained with this config (e.g. OUTPUT_DIR/model_final.pth), not ImageNet weights or the "
                f"checkpoint of another config. Check MODEL.WEIGHTS and MODEL.ROI_HEADS.NUM_CLASSES / "
                f"MODEL.ACM settings."
            )
            self.logger.error(message)
            raise CheckpointLoadError(message)
        return incompatible

    def _check_context_keys(self, unexpected_keys: List[str]) -> None:
        """Refuse checkpoint keys that the model does not have under the ``context`` or
        ``context_after`` slot of one of its ResNet blocks (also those of a model without context
        modules), naming the registered module whose
        parameters they are (the one sharing most of their names)."""
        blocks = {n for n, m in self.model.named_modules() if isinstance(m, CNNBlockBase)}
        found = [m for m in map(_CONTEXT_KEY.match, unexpected_keys) if m and m.group(1) in blocks]
        if not found:
            return
        names = sorted({m.group(3) for m in found})  # e.g. "fc1.weight"
        owner = max(_context_module_keys().items(), key=lambda item: len(item[1].intersection(names)))[0]
        ours = sorted({getattr(type(m), "NAME", type(m).__name__) for m in context_modules(self.model, qualified=True).values()})
        shown = f"MODEL.ACM.MODULE {ours[0]!r}" if len(ours) == 1 else f"context modules {ours}"
        if not ours:
            shown = "MODEL.ACM.MODULE 'none' (no context module)"
        if owner in ours:
            cause = f"were trained with other MODEL.ACM settings of {owner} than this model's"
        else:
            cause = f"are the parameters of {owner} modules, which this model ({shown}) does not have"
        message = (
            f"{len(found)} context-module entries of the checkpoint (e.g. {[m.group(0) for m in found[:3]]}) {cause}: "
            f"they would be dropped, and the model's context modules (if any) keep their initialisation. Build the model "
            f"with MODEL.ACM.MODULE {owner!r} and the MODEL.ACM settings the checkpoint was trained with, or remove "
            f"the keys with '.context.' / '.context_after.' from the checkpoint to start its context modules afresh."
        )
        self.logger.error(message)
        raise CheckpointLoadError(message)


#: "<block>.<slot>.<key of the module>", slot "context" (residual branch) or "context_after".
_CONTEXT_KEY = re.compile(r"^(.*)\.(context|context_after)\.(.+)$")


def _context_module_keys():
    """Registered name -> the state_dict keys of that module built with its defaults for 64
    channels (modules that cannot be built so are left out)."""
    keys = {}
    for name, cls in sorted(CONTEXT_MODULE_REGISTRY):
        try:
            keys[name] = set(cls(64).state_dict())
        except (TypeError, ValueError):
            continue
    return keys


def _disk_full_errno(error: BaseException) -> Optional[int]:
    """ENOSPC / EDQUOT if ``error`` or an error it was raised from says the disk is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def _storage_nbytes(obj, seen=None) -> int:
    """Bytes of the tensor storages in a (nested) checkpoint dict: what torch.save writes,
    give or take a few kilobytes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_storage_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_storage_nbytes(v, seen) for v in obj)
    return 0


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
