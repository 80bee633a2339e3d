"""The ACM authors' checkpoint layout, and its conversion to acm-d2's.

The authors' Detectron2 fork stores each ACM as the child ``module`` of a ResNet block, in
the layout of their standalone module (``add_mod`` is K, ``sub_mod`` is Q, ``mul_mod`` is P):

    <block>.module.add_mod.map_gen.0.{weight,bias}        (G, C/G, 1, 1), (G,)
    <block>.module.sub_mod.map_gen.0.{weight,bias}        (G, C/G, 1, 1), (G,)
    <block>.module.mul_mod.feature_gen.0.{weight,bias}    (C/2, C/G, 1, 1), (C/2,)
    <block>.module.mul_mod.feature_gen.2.{weight,bias}    (C, C/(2G), 1, 1), (C,)

with ``<block>`` e.g. ``backbone.bottom_up.res3.0``. :class:`acm_d2.ACM` keeps the same
numbers as ``<block>.context.kq_logits.weight`` (K and Q interleaved per group: output channels
[K_0, Q_0, K_1, Q_1, ...]) and ``<block>.context.channel_gate.{0,2}.*``; the biases of the K and
Q maps are dropped (softmax is shift-invariant, so they change nothing). Every other key is
Detectron2's and is the same in both layouts.

The conversion happens where the weights are loaded, inside the model
(``_load_from_state_dict`` of the ACM blocks and of :class:`acm_d2.ACM`), so
``model.load_state_dict``, ``DetectionCheckpointer``, ``DefaultPredictor`` and every tool
load the authors' checkpoints the same way. :func:`convert_official_state_dict` converts a
whole state dict without a model (``tools/convert_official_checkpoint.py``).
"""
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, MutableMapping, Tuple

import torch

__all__ = [
    "AUTHORS_ACM_SUFFIXES",
    "BLOCK_CONTEXT_CHILD",
    "CheckpointConversionError",
    "ConversionReport",
    "compare_with_model",
    "convert_acm_keys",
    "convert_official_state_dict",
    "rename_authors_block_keys",
    "to_official_state_dict",
]

logger = logging.getLogger(__name__)

#: The tensors of one of the authors' modules (suffixes after ``<block>.module.``).
AUTHORS_ACM_SUFFIXES = (
    "add_mod.map_gen.0.weight",
    "add_mod.map_gen.0.bias",
    "sub_mod.map_gen.0.weight",
    "sub_mod.map_gen.0.bias",
    "mul_mod.feature_gen.0.weight",
    "mul_mod.feature_gen.0.bias",
    "mul_mod.feature_gen.2.weight",
    "mul_mod.feature_gen.2.bias",
)
# "<block>.module.{add,sub,mul}_mod.<rest>" anywhere in a key.
_AUTHORS_KEY = re.compile(r"^(?P<block>(?:.*\.)?)module\.(?P<suffix>(?:add_mod|sub_mod|mul_mod)\..*)$")


#: acm-d2's name of the context module a block hosts on its residual branch (the ACM of the
#: authors' layout); acm-d2 before 0.3 named it ``acm`` (or ``se`` for SE).
BLOCK_CONTEXT_CHILD = "context"
# Child names of a block's module in earlier layouts: the authors' fork, acm-d2 < 0.3.
_EARLIER_CHILDREN = ("module.", "acm.", "se.")


def rename_authors_block_keys(state_dict: MutableMapping[str, torch.Tensor], prefix: str) -> None:
    """In place, for the block at ``prefix``: the keys of its module in earlier layouts ->
    ``<prefix>context.*``: the authors' ``<prefix>module.{add,sub,mul}_mod.*`` and acm-d2's
    (before 0.3) ``<prefix>acm.*`` and ``<prefix>se.*``. The module itself then converts the
    rest (:func:`convert_acm_keys`)."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + c for c in _EARLIER_CHILDREN))]:
        child, suffix = key[len(prefix):].split(".", 1)
        if child != "module" or suffix.split(".", 1)[0] in ("add_mod", "sub_mod", "mul_mod"):
            state_dict[f"{prefix}{BLOCK_CONTEXT_CHILD}.{suffix}"] = state_dict.pop(key)


def convert_acm_keys(state_dict: MutableMapping[str, torch.Tensor], prefix: str) -> None:
    """In place, for the module at ``prefix``: the authors' standalone layout (``add_mod.*``,
    ``sub_mod.*``, ``mul_mod.*``, all 8 tensors) -> ``kq_logits.weight`` and
    ``channel_gate.{0,2}.*``; and ``kq_logits.bias`` (layout version 1) is dropped.

    An incomplete set of the authors' tensors is left as it is, so that loading reports the
    keys as unexpected and the module's own as missing."""
    state_dict.pop(prefix + "kq_logits.bias", None)
    authors = [prefix + s for s in AUTHORS_ACM_SUFFIXES]
    if not all(k in state_dict for k in authors):
        return
    k_weight, k_bias, q_weight, q_bias, w1, b1, w2, b2 = (state_dict.pop(k) for k in authors)
    groups = k_weight.shape[0]
    # (G, C/G, 1, 1) x 2 -> (G, 2, C/G, 1, 1) -> (2G, C/G, 1, 1): rows K_0, Q_0, K_1, Q_1, ...
    state_dict[prefix + "kq_logits.weight"] = torch.stack([k_weight, q_weight], dim=1).reshape(
        2 * groups, *k_weight.shape[1:]
    )
    state_dict[prefix + "channel_gate.0.weight"] = w1
    state_dict[prefix + "channel_gate.0.bias"] = b1
    state_dict[prefix + "channel_gate.2.weight"] = w2
    state_dict[prefix + "channel_gate.2.bias"] = b2


class CheckpointConversionError(ValueError):
    """The state dict has ACM keys that cannot be converted; ``report`` says which."""

    def __init__(self, message: str, report: "ConversionReport"):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    """What :func:`convert_official_state_dict` did and could not do.

    Attributes:
        converted: block prefix ("backbone.bottom_up.res3.0") -> (C, G) of its module.
        passed_through: number of keys copied unchanged (Detectron2's own keys).
        problems: one line per ACM key or module that cannot be converted (unknown name,
            missing tensors, shapes that do not fit one (C, G)).
    """

    converted: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    passed_through: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        by_shape: Dict[Tuple[int, int], int] = {}
        for shape in self.converted.values():
            by_shape[shape] = by_shape.get(shape, 0) + 1
        shapes = ", ".join(f"{n} x (C={c}, G={g})" for (c, g), n in sorted(by_shape.items()))
        text = f"converted {len(self.converted)} ACM modules ({shapes or 'none'}); {self.passed_through} other keys unchanged"
        if self.problems:
            text += f"; {len(self.problems)} problems:\n  " + "\n  ".join(self.problems)
        return text


def _check_module(block: str, tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Problems of one of the authors' modules (its 8 tensors by suffix): missing tensors, or
    shapes that do not fit the (C, G) of ``add_mod.map_gen.0.weight``."""
    missing = [s for s in AUTHORS_ACM_SUFFIXES if s not in tensors]
    if missing:
        return [f"incomplete ACM at '{block}': missing {', '.join(missing)}"]
    k_weight = tensors["add_mod.map_gen.0.weight"]
    if k_weight.dim() != 4:
        return [f"{block}.module.add_mod.map_gen.0.weight has shape {tuple(k_weight.shape)}, expected (G, C/G, 1, 1)"]
    groups, per_group = int(k_weight.shape[0]), int(k_weight.shape[1])
    channels = groups * per_group
    if channels % 2 or (channels // 2) % groups:
        return [f"{block}: add_mod weight {tuple(k_weight.shape)} gives C={channels}, G={groups}, but G must divide C/2"]
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
    return [
        f"{block}.module.{suffix} has shape {tuple(tensors[suffix].shape)}, expected {shape} for C={channels}, G={groups}"
        for suffix, shape in expected.items()
        if tuple(tensors[suffix].shape) != shape
    ]


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> Tuple["OrderedDict[str, torch.Tensor]", ConversionReport]:
    """A whole state dict in the authors' layout -> acm-d2's, without a model.

    ``<block>.module.{add_mod,sub_mod,mul_mod}.*`` becomes ``<block>.context.{kq_logits,
    channel_gate}.*`` in the place of the module's first key; every other key is copied
    unchanged, in order.

    Args:
        strict: raise :class:`CheckpointConversionError` if some ACM key cannot be
            converted; with False, log the problems and leave those modules out.
    Returns:
        (converted state dict, :class:`ConversionReport`)
    """
    report = ConversionReport()
    modules: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()  # block prefix -> {suffix: tensor}
    order: List[Tuple[str, str]] = []  # ("key", key) or ("module", block prefix)
    for key, value in state_dict.items():
        match = _AUTHORS_KEY.match(key)
        if match is None:
            order.append(("key", key))
            report.passed_through += 1
            continue
        block, suffix = match.group("block"), match.group("suffix")
        if suffix not in AUTHORS_ACM_SUFFIXES:
            report.problems.append(f"unmapped ACM key (not a known name of the authors' module): {key}")
        if block not in modules:
            modules[block] = {}
            order.append(("module", block))
        modules[block][suffix] = value

    converted: Dict[str, Dict[str, torch.Tensor]] = {}
    for block, tensors in modules.items():
        name = block[:-1] if block else "<top level>"
        problems = _check_module(name, tensors)
        if problems or any(s not in AUTHORS_ACM_SUFFIXES for s in tensors):
            report.problems.extend(problems)
            continue
        child = f"{block}{BLOCK_CONTEXT_CHILD}."
        module_state = {f"{child}{suffix}": tensor for suffix, tensor in tensors.items()}
        convert_acm_keys(module_state, child)
        converted[block] = module_state
        report.converted[name] = (tensors["add_mod.map_gen.0.weight"].shape[0] * tensors["add_mod.map_gen.0.weight"].shape[1],
                                  tensors["add_mod.map_gen.0.weight"].shape[0])

    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for kind, name in order:
        if kind == "key":
            result[name] = state_dict[name]
        else:
            result.update(converted.get(name, {}))
    if not report.ok:
        message = "Cannot convert the ACM keys of this checkpoint:\n  " + "\n  ".join(report.problems)
        if strict:
            raise CheckpointConversionError(message, report)
        logger.warning("%s\nThose modules are left out (strict=False).", message)
    logger.info("ACM checkpoint conversion: %s", report.summary())
    return result, report


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The inverse of :func:`convert_official_state_dict`: ``<block>.context.*`` -> the authors'
    ``<block>.module.{add_mod,sub_mod,mul_mod}.*``, with zero biases for the K and Q maps.
    Only the full module ("P(X+(K-Q))") has an authors' layout. Other keys are unchanged."""
    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        head, sep, suffix = f".{key}".rpartition(f".{BLOCK_CONTEXT_CHILD}.")
        block = f"{head[1:]}." if head else ""
        if not sep:
            result[key] = value
        elif suffix == "kq_logits.weight":
            kq = value.reshape(value.shape[0] // 2, 2, *value.shape[1:])
            for index, name in enumerate(("add_mod", "sub_mod")):
                result[f"{block}module.{name}.map_gen.0.weight"] = kq[:, index].contiguous()
                result[f"{block}module.{name}.map_gen.0.bias"] = value.new_zeros(kq.shape[0])
        elif suffix.startswith("channel_gate."):
            _, index, kind = suffix.split(".")
            result[f"{block}module.mul_mod.feature_gen.{index}.{kind}"] = value
        elif suffix != "kq_logits.bias":
            result[key] = value
    return result


def compare_with_model(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Tuple[bool, List[str]]:
    """Keys and shapes of ``state_dict`` against ``model``'s: (True if every ACM key of both
    is present in the other with the same shape, lines describing every difference)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    missing_acm = [k for k in missing if f".{BLOCK_CONTEXT_CHILD}." in k]
    unexpected_acm = [k for k in unexpected if f".{BLOCK_CONTEXT_CHILD}." in k]
    lines = [
        f"Checked against the config's model: {len(expected)} keys; {len(missing)} missing from the file "
        f"({len(missing_acm)} of them ACM), {len(unexpected)} not in the model ({len(unexpected_acm)} ACM), "
        f"{len(wrong_shape)} with other shapes."
    ]
    lines += [f"  missing in file:  {k}" for k in missing]
    lines += [f"  not in model:     {k}" for k in unexpected]
    lines += [f"  shape mismatch:   {k}: file {got}, model {want}" for k, got, want in wrong_shape]
    return not (missing_acm or unexpected_acm or wrong_shape), lines
