"""Loading the ACM authors' checkpoints into this package's models.

The authors' Detectron2 fork stores each ACM as the child ``module`` of a ResNet block, in
the layout of their standalone module (``add_mod`` is K, ``sub_mod`` is Q, ``mul_mod`` is P):

    <block>.module.add_mod.map_gen.0.{weight,bias}        (G, C/G, 1, 1), (G,)
    <block>.module.sub_mod.map_gen.0.{weight,bias}        (G, C/G, 1, 1), (G,)
    <block>.module.mul_mod.feature_gen.0.{weight,bias}    (C/2, C/G, 1, 1), (C/2,)
    <block>.module.mul_mod.feature_gen.2.{weight,bias}    (C, C/(2G), 1, 1), (C,)

with ``<block>`` e.g. ``backbone.bottom_up.res3.0``. :class:`acm_d2.ACM` keeps the same
numbers under ``<block>.acm.kq_logits.*`` (K and Q interleaved per group: output channels
[K_0, Q_0, K_1, Q_1, ...]) and ``<block>.acm.channel_gate.{0,2}.*``. Every other key is
Detectron2's and passes through unchanged.

:func:`convert_official_state_dict` converts a whole model's state dict,
:func:`convert_official_acm_state_dict` the state dict of one module (keys ``add_mod.*``,
``sub_mod.*``, ``mul_mod.*``, as :class:`acm_d2.ReferenceACM` has them), and
:func:`to_official_state_dict` goes back. :func:`safe_torch_load` is how every acm-d2 tool
and the trainer read a torch file (``weights_only=True``: no code stored in it runs), and
:func:`load_checkpoint_file` reads the state dict of a ``.pth`` file with it.
"""
import io
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "CheckpointConversionError",
    "CheckpointLoadError",
    "ConversionReport",
    "UnsafeCheckpointError",
    "convert_official_acm_state_dict",
    "convert_official_state_dict",
    "extract_state_dict",
    "load_checkpoint_file",
    "safe_torch_load",
    "to_official_state_dict",
]

logger = logging.getLogger(__name__)

# Suffix of an authors' ACM key (after "<block>.module.") -> (our suffix after "<block>.acm.",
# kind). kind "K"/"Q" entries are interleaved into kq_logits.
_OFFICIAL_SUFFIXES = OrderedDict(
    [
        ("add_mod.map_gen.0.weight", ("kq_logits.weight", "K")),
        ("add_mod.map_gen.0.bias", ("kq_logits.bias", "K")),
        ("sub_mod.map_gen.0.weight", ("kq_logits.weight", "Q")),
        ("sub_mod.map_gen.0.bias", ("kq_logits.bias", "Q")),
        ("mul_mod.feature_gen.0.weight", ("channel_gate.0.weight", "P")),
        ("mul_mod.feature_gen.0.bias", ("channel_gate.0.bias", "P")),
        ("mul_mod.feature_gen.2.weight", ("channel_gate.2.weight", "P")),
        ("mul_mod.feature_gen.2.bias", ("channel_gate.2.bias", "P")),
    ]
)
_OUR_SUFFIXES = (
    "kq_logits.weight",
    "kq_logits.bias",
    "channel_gate.0.weight",
    "channel_gate.0.bias",
    "channel_gate.2.weight",
    "channel_gate.2.bias",
)
# The authors' ACM submodule names: a key with one of them that is not a known suffix is an
# ACM key this converter does not understand.
_OFFICIAL_KEY = re.compile(r"^(?P<block>(?:.*\.)?)module\.(?P<suffix>(?:add_mod|sub_mod|mul_mod)\..*)$")


class CheckpointConversionError(ValueError):
    """The state dict has ACM keys that cannot be mapped; ``report`` says which."""

    def __init__(self, message: str, report: "ConversionReport"):
        super().__init__(message)
        self.report = report


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read safely (or at all)."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A torch file that stores Python objects besides tensors: loading it would unpickle them,
    which can run code, so :func:`safe_torch_load` refuses it."""


@dataclass
class ConversionReport:
    """What :func:`convert_official_state_dict` did and what it could not do.

    Attributes:
        converted: block prefix ("backbone.bottom_up.res3.0") -> (C, G) of its module.
        passed_through: number of keys copied unchanged (Detectron2's own keys).
        unmapped: ACM-looking keys (``module.{add,sub,mul}_mod.*``) that are no known name;
            the module they belong to is not converted.
        incomplete: block prefix -> the authors' key suffixes missing for that module.
        shape_errors: messages about shapes inconsistent with one (C, G).
        already_converted: keys already in this package's layout (``*.acm.*``).
    """

    converted: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    passed_through: int = 0
    unmapped: List[str] = field(default_factory=list)
    incomplete: Dict[str, List[str]] = field(default_factory=dict)
    shape_errors: List[str] = field(default_factory=list)
    already_converted: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.incomplete or self.shape_errors)

    def errors(self) -> List[str]:
        """One line per problem."""
        lines = [f"unmapped ACM key (not a known name of the authors' module): {k}" for k in self.unmapped]
        for block, missing in self.incomplete.items():
            lines.append(f"incomplete ACM at '{block}': missing {', '.join(missing)}")
        lines.extend(f"shape error: {m}" for m in self.shape_errors)
        return lines

    def summary(self) -> str:
        by_shape: Dict[Tuple[int, int], int] = {}
        for shape in self.converted.values():
            by_shape[shape] = by_shape.get(shape, 0) + 1
        shapes = ", ".join(f"{n} x (C={c}, G={g})" for (c, g), n in sorted(by_shape.items()))
        text = (
            f"converted {len(self.converted)} ACM modules ({shapes or 'none'}); "
            f"{self.passed_through} other keys unchanged"
        )
        if self.already_converted:
            text += f"; {len(self.already_converted)} keys already in acm_d2 layout"
        if not self.ok:
            text += f"; {len(self.errors())} problems:\n  " + "\n  ".join(self.errors())
        return text


def _shape_of_module(block: str, tensors: Mapping[str, torch.Tensor], report: ConversionReport) -> Optional[Tuple[int, int]]:
    """Infer (C, G) from add_mod's weight and check every other tensor against it."""
    k_weight = tensors["add_mod.map_gen.0.weight"]
    if k_weight.dim() != 4 or tuple(k_weight.shape[2:]) != (1, 1):
        report.shape_errors.append(
            f"{block}.module.add_mod.map_gen.0.weight has shape {tuple(k_weight.shape)}, expected (G, C/G, 1, 1)"
        )
        return None
    groups, per_group = int(k_weight.shape[0]), int(k_weight.shape[1])
    channels = groups * per_group
    if channels % 2 or (channels // 2) % groups:
        report.shape_errors.append(
            f"{block}: add_mod weight {tuple(k_weight.shape)} gives C={channels}, G={groups}, but G must "
            f"divide C/2"
        )
        return None
    expected = {
        "add_mod.map_gen.0.weight": (groups, per_group, 1, 1),
        "add_mod.map_gen.0.bias": (groups,),
        "sub_mod.map_gen.0.weight": (groups, per_group, 1, 1),
        "sub_mod.map_gen.0.bias": (groups,),
        "mul_mod.feature_gen.0.weight": (channels // 2, per_group, 1, 1),
        "mul_mod.feature_gen.0.bias": (channels // 2,),
        "mul_mod.feature_gen.2.weight": (channels, channels // (2 * groups), 1, 1),
        "mul_mod.feature_gen.2.bias": (channels,),
    }
    good = True
    for suffix, shape in expected.items():
        actual = tuple(tensors[suffix].shape)
        if actual != shape:
            report.shape_errors.append(
                f"{block}.module.{suffix} has shape {actual}, expected {shape} for C={channels}, G={groups} "
                f"(from add_mod.map_gen.0.weight {tuple(k_weight.shape)})"
            )
            good = False
    return (channels, groups) if good else None


def _convert_module(tensors: Mapping[str, torch.Tensor], groups: int) -> Dict[str, torch.Tensor]:
    """The 8 authors' tensors of one module -> the 6 tensors of acm_d2.ACM (suffixes)."""
    k_w, q_w = tensors["add_mod.map_gen.0.weight"], tensors["sub_mod.map_gen.0.weight"]
    k_b, q_b = tensors["add_mod.map_gen.0.bias"], tensors["sub_mod.map_gen.0.bias"]
    # (G, C/G, 1, 1) x 2 -> (G, 2, C/G, 1, 1) -> (2G, C/G, 1, 1): rows K_0, Q_0, K_1, Q_1, ...
    kq_weight = torch.stack([k_w, q_w], dim=1).reshape(2 * groups, *k_w.shape[1:])
    kq_bias = torch.stack([k_b, q_b], dim=1).reshape(2 * groups)
    return {
        "kq_logits.weight": kq_weight.contiguous(),
        "kq_logits.bias": kq_bias.contiguous(),
        "channel_gate.0.weight": tensors["mul_mod.feature_gen.0.weight"],
        "channel_gate.0.bias": tensors["mul_mod.feature_gen.0.bias"],
        "channel_gate.2.weight": tensors["mul_mod.feature_gen.2.weight"],
        "channel_gate.2.bias": tensors["mul_mod.feature_gen.2.bias"],
    }


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> Tuple["OrderedDict[str, torch.Tensor]", ConversionReport]:
    """Convert a state dict in the authors' layout to this package's.

    ``<block>.module.{add_mod,sub_mod,mul_mod}.*`` becomes ``<block>.acm.{kq_logits,
    channel_gate}.*`` (``<block>`` may be empty: a single module's state dict converts to
    ``acm.*``; see :func:`convert_official_acm_state_dict` for bare ``kq_logits.*`` keys).
    Every other key is copied unchanged, in order.

    Args:
        state_dict: the authors' model state dict (tensors).
        strict: raise :class:`CheckpointConversionError` when some ACM key cannot be mapped
            (an unknown name, a module with missing keys, or shapes that do not fit one
            (C, G)); with False, log the problems and leave those keys out.
    Returns:
        (converted state dict, :class:`ConversionReport`)
    """
    report = ConversionReport()
    # block prefix ("" or "backbone.bottom_up.res3.0.") -> {suffix: tensor}
    modules: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    placeholder = object()
    order: List = []  # keys of `out` in order, with (block,) markers where a module goes
    unknown_variant = set()
    for key, value in state_dict.items():
        match = _OFFICIAL_KEY.match(key)
        if match is None:
            if ".acm." in f".{key}" and any(key.endswith(s) for s in _OUR_SUFFIXES):
                report.already_converted.append(key)
            else:
                report.passed_through += 1
            out[key] = value
            order.append(key)
            continue
        block, suffix = match.group("block"), match.group("suffix")
        if suffix not in _OFFICIAL_SUFFIXES:
            report.unmapped.append(key)
            unknown_variant.add(block)  # a module with names we do not know: not converted
            continue
        if block not in modules:
            modules[block] = {}
            order.append((block, placeholder))
        modules[block][suffix] = value

    converted: Dict[str, Dict[str, torch.Tensor]] = {}
    for block, tensors in modules.items():
        name = block[:-1] if block else "<top level>"
        if block in unknown_variant:
            continue
        missing = [s for s in _OFFICIAL_SUFFIXES if s not in tensors]
        if missing:
            report.incomplete[name] = missing
            continue
        shape = _shape_of_module(name, tensors, report)
        if shape is None:
            continue
        report.converted[name] = shape
        converted[block] = _convert_module(tensors, shape[1])

    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for item in order:
        if isinstance(item, tuple):
            block = item[0]
            for suffix, tensor in converted.get(block, {}).items():
                result[f"{block}acm.{suffix}"] = tensor
        else:
            result[item] = out[item]

    if not report.ok:
        message = "Cannot convert the ACM keys of this checkpoint:\n  " + "\n  ".join(report.errors())
        if strict:
            logger.error(message)
            raise CheckpointConversionError(message, report)
        logger.warning("%s\nThose keys are left out (strict=False).", message)
    logger.info("ACM checkpoint conversion: %s", report.summary())
    return result, report


def convert_official_acm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """One module: ``add_mod.*``, ``sub_mod.*``, ``mul_mod.*`` (the layout of the authors'
    standalone ``ACM`` and of :class:`acm_d2.ReferenceACM`) -> the state dict of
    :class:`acm_d2.ACM` (``kq_logits.*``, ``channel_gate.*``). Raises
    :class:`CheckpointConversionError` on missing, unknown or inconsistent keys."""
    prefixed = OrderedDict((f"module.{k}", v) for k, v in state_dict.items())
    unknown = [k for k in state_dict if not _OFFICIAL_KEY.match(f"module.{k}")]
    if unknown:
        report = ConversionReport(unmapped=unknown)
        raise CheckpointConversionError(
            f"Not keys of the authors' ACM module (add_mod.*, sub_mod.*, mul_mod.*): {unknown}", report
        )
    converted, _ = convert_official_state_dict(prefixed, strict=True)
    return OrderedDict((k[len("acm."):], v) for k, v in converted.items())


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The inverse of :func:`convert_official_state_dict`: ``<block>.acm.*`` of acm_d2 ->
    ``<block>.module.{add_mod,sub_mod,mul_mod}.*`` of the authors. Other keys are unchanged."""
    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        head, sep, suffix = f".{key}".rpartition(".acm.")
        if not sep or suffix not in _OUR_SUFFIXES:
            result[key] = value
            continue
        block = f"{head[1:]}." if head else ""
        if suffix == "kq_logits.weight":
            groups = value.shape[0] // 2
            kq = value.reshape(groups, 2, *value.shape[1:])
            result[f"{block}module.add_mod.map_gen.0.weight"] = kq[:, 0].contiguous()
            result[f"{block}module.sub_mod.map_gen.0.weight"] = kq[:, 1].contiguous()
        elif suffix == "kq_logits.bias":
            kq = value.reshape(-1, 2)
            result[f"{block}module.add_mod.map_gen.0.bias"] = kq[:, 0].contiguous()
            result[f"{block}module.sub_mod.map_gen.0.bias"] = kq[:, 1].contiguous()
        else:
            index = suffix.split(".")[1]  # channel_gate.<0|2>.<weight|bias>
            result[f"{block}module.mul_mod.feature_gen.{index}.{suffix.split('.')[-1]}"] = value
    return result


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


def safe_torch_load(path: str):
    """``torch.load(path, map_location="cpu", weights_only=True)``: how acm-d2 reads every
    checkpoint that is not a ``.pkl`` (``.pth``, ``.pyth``, any other name). Loading cannot
    run code stored in the file.

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
        return torch.load(path, map_location="cpu", weights_only=True)
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
