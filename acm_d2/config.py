"""The config keys of acm-d2, and the one way tools build configs and models from config files."""
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = [
    "ModelForInference",
    "SafeCfgNode",
    "add_acm_config",
    "build_model_from_config_file",
    "check_periods",
    "check_registered_names",
    "get_acm_cfg",
    "load_model_for_inference",
]

logger = logging.getLogger(__name__)


def add_acm_config(cfg) -> None:
    """Add MODEL.ACM and DATASETS.COCO_INSTANCES to a Detectron2 config (in place)."""
    cfg.MODEL.ACM = CN()
    # The context module of the backbone, a name of acm_d2.modeling.CONTEXT_MODULE_REGISTRY:
    # "ACM" (default), its peers "SE" (squeeze-and-excitation), "NL" (non-local), "CC"
    # (criss-cross attention), "GC" (global context), "CBAM", a module you registered, or
    # "none" (the plain ResNet through the same code, for comparisons). ACM, SE, GC and CBAM
    # go on the residual branch of every block of STAGES (after the last conv + norm, before
    # the shortcut add); NL and CC after the blocks of AFTER_BLOCKS (after the add and ReLU).
    cfg.MODEL.ACM.MODULE = "ACM"
    # Which ACM (the paper's Table 2a): "P(X+(K-Q))" (the full module, default), "X+(K-Q)"
    # (no channel re-calibration P), "P(X+K)" (no Q) or "PX" (P only). The last two have no
    # orthogonality term: they need ORTH_LOSS_WEIGHT 0.
    cfg.MODEL.ACM.VARIANT = "P(X+(K-Q))"
    # G: channel groups of every ACM; each group has its own K and Q attention map. Must divide
    # half the channels of every stage that gets ACM (all stages of R-50: 1..128). Paper: 32.
    cfg.MODEL.ACM.GROUPS = 32
    # How every ACM starts: "authors" (default; the paper's Kaiming init) or "identity" (K - Q
    # = 0 and P = 1/2 exactly; when the weights of a network without ACM load, the norm before
    # each ACM loads doubled, so the network computes what it computed without ACM, and every
    # ACM parameter still learns). For adding ACM to a trained model: docs/initialisation.md.
    cfg.MODEL.ACM.INIT = "authors"
    # For modules on the residual branch (ACM, SE, GC, CBAM): the stages whose every block gets
    # one, from "res2", "res3", "res4", "res5", each at most once. Empty (default): every stage
    # not frozen by MODEL.BACKBONE.FREEZE_AT, as the authors did (res3-res5 for FREEZE_AT=2: 13
    # modules in R-50). Naming a frozen stage is an error; NL and CC refuse it (AFTER_BLOCKS).
    cfg.MODEL.ACM.STAGES = []
    # For modules after whole blocks (NL, CC): the blocks they follow, each "resS.i" (block i of
    # stage S, negative i counting from the end) or "resS" (every block of S). Empty (default):
    # ["res4.-2"], one unit right before the last block of res4, the Mask R-CNN setting of the
    # non-local and CCNet papers. Blocks of frozen stages are refused; ACM, SE, GC and CBAM
    # refuse this key (STAGES).
    cfg.MODEL.ACM.AFTER_BLOCKS = []
    # lambda of the orthogonality loss "loss_acm_orth" = lambda * |mean over the batch of the
    # sum over the chosen modules of (K.Q)/C|; a finite number >= 0, 0 turns it off. Paper:
    # 0.1. The ACM meta-architectures (ACMGeneralizedRCNN, ACMRetinaNet, ACMPanopticFPN) add it.
    cfg.MODEL.ACM.ORTH_LOSS_WEIGHT = 0.1
    # The modules whose terms the loss sums: "all" (default; the paper's equation 6 sums over
    # all modules) or "res5" (the authors' Detectron2 code, with which the paper's COCO models
    # were trained: only the 3 modules of res5; the COCO configs use it). FPN models only.
    cfg.MODEL.ACM.ORTH_LOSS_MODULES = "all"
    # SE: the reduction ratio r of its hidden layer (C -> C/r -> C), an integer in [1, C]. Paper: 16.
    cfg.MODEL.ACM.SE_REDUCTION = 16
    # NL: C / C', the ratio of the block's width to its inner width (theta, phi, g), an integer
    # in [1, C]. Paper: 2.
    cfg.MODEL.ACM.NL_REDUCTION = 2
    # NL: the norm after its output conv W_z, whose gamma starts at 0: "" (none: the conv
    # itself starts at 0; default, for frozen-BN backbones), "BN", "SyncBN", "GN", ...
    cfg.MODEL.ACM.NL_NORM = ""
    # CC: C / C', the width ratio of its query and key convs, an integer in [1, C]. Paper: 8.
    cfg.MODEL.ACM.CC_REDUCTION = 8
    # CC: R, how many times the criss-cross attention runs, with shared weights; >= 1. Paper: 2.
    cfg.MODEL.ACM.CC_RECURRENCE = 2
    # GC: the bottleneck ratio of its transform (C -> ratio * C -> C), in (0, 1]. The paper's
    # COCO models: 0.25 (default) and 0.0625 (1/16).
    cfg.MODEL.ACM.GC_RATIO = 0.25
    # CBAM: the reduction ratio of its channel MLP, an integer in [1, C]. Paper: 16.
    cfg.MODEL.ACM.CBAM_REDUCTION = 16
    # CBAM: the kernel size of its spatial-attention conv, odd. Paper: 7.
    cfg.MODEL.ACM.CBAM_KERNEL_SIZE = 7
    # CBAM: the norm after that conv: "BN" (the reference code), "" (none), "SyncBN", ...
    cfg.MODEL.ACM.CBAM_NORM = "BN"

    # Users' COCO-format datasets that tools/train_net.py registers before training, in every
    # process: a list of [name, json_file, image_root] triples; the names can then be used
    # in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.COCO_INSTANCES = []

    # TEST.COCO_EVAL_IMPL: which COCO evaluator COCOEvaluator runs (see acm_d2/evaluation).
    from .evaluation import add_evaluation_config

    add_evaluation_config(cfg)

    # Issue 18: accept COCO image files that resolve outside their image_root (an absolute
    # file_name, "..", a symlink); False refuses them at registration, naming the file.
    cfg.DATASETS.COCO_ALLOW_OUTSIDE_ROOT = False


def check_registered_names(cfg) -> None:
    """Raise ValueError if MODEL.META_ARCHITECTURE or MODEL.BACKBONE.NAME names nothing
    registered, listing the registered names."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    from . import modeling  # noqa: F401  (registers the ACM names)

    for key, value, registry in (
        ("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, META_ARCH_REGISTRY),
        ("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, BACKBONE_REGISTRY),
    ):
        if value not in registry:
            raise ValueError(f"{key} {value!r} is not registered; registered names: {sorted(name for name, _ in registry)}")


#: The periods of a config, in iterations: (key, what 0 means, or None where 0 is refused).
_PERIODS = (
    ("SOLVER.CHECKPOINT_PERIOD", None),  # Detectron2's PeriodicCheckpointer: (iteration + 1) % period
    ("TEST.EVAL_PERIOD", "evaluate only at the end of training"),
    ("VIS_PERIOD", "draw no training visualisations"),
)


def check_periods(cfg) -> None:
    """Raise ValueError, naming the setting, for a period Detectron2 cannot use:
    SOLVER.CHECKPOINT_PERIOD <= 0 (Detectron2 divides by it), TEST.EVAL_PERIOD or VIS_PERIOD < 0
    (0 turns them off)."""
    for key, zero in _PERIODS:
        section, _, name = key.rpartition(".")
        value = getattr(cfg.get(section) if section else cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if zero is None else 0):
            allowed = "a positive number of iterations" if zero is None else f"a number of iterations >= 0 (0: {zero})"
            raise ValueError(f"{key} {value!r}: expected {allowed}")


def python_tag_error(config_file: str, error) -> ValueError:
    """The error for a YAML file that has a Python tag (``error``: yaml's ConstructorError)."""
    return ValueError(
        f"{config_file}: the YAML config has a tag that would construct Python objects ({error.problem}); "
        f"acm-d2 reads configs with yaml.safe_load only. Remove the tag."
    )


def lazy_config_error(config_file: str) -> ValueError:
    """The error for a LazyConfig (``.py``) file where a YAML config is merged."""
    return ValueError(
        f"{config_file} is a LazyConfig (a Python config), not a YAML config: acm_d2.train_net "
        f"(tools/train_net.py, acm-d2-train-net) and get_acm_cfg read YAML only. Train it with Detectron2's "
        f"LazyConfig script (tools/lazyconfig_train_net.py of a Detectron2 checkout): python -m "
        f"acm_d2.detectron2_tools /path/to/detectron2/tools/lazyconfig_train_net.py --config-file {config_file} "
        f"[key=value ...] (docs/integration.md, section 3)"
    )


class _UnknownBase(ValueError):
    """An ``acm_d2://`` name in ``_BASE_`` that is no shipped config (not yet told which file named it)."""


def _resolve_base(filename: str) -> str:
    """The path of a file that fvcore's ``_BASE_`` handling asks for: ``acm_d2://NAME`` (which
    fvcore joins to the naming file's folder: ``FOLDER/acm_d2://NAME``) -> the shipped config."""
    from .model_zoo import PREFIX, get_config_file

    filename = str(filename)
    at = filename.find(PREFIX)
    if at < 0 or (at > 0 and filename[at - 1] != "/"):
        return filename
    try:
        return get_config_file(filename[at:])
    except ValueError as e:
        raise _UnknownBase(str(e)) from None


class SafeCfgNode(CN):
    """Detectron2's CfgNode whose YAML files (the one given and every ``_BASE_``, at any depth)
    are read with ``yaml.safe_load`` only (``allow_unsafe`` is ignored), where ``_BASE_`` may name
    a shipped config as ``acm_d2://NAME`` (an unknown name raises ``ValueError`` naming the file
    and the close names), and where a LazyConfig ``.py`` is refused with the command that trains
    it. :func:`get_acm_cfg` returns one; so does ``get_cfg()`` under :mod:`acm_d2.detectron2_tools`."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        filename = _resolve_base(filename)
        if str(filename).endswith(".py"):
            raise lazy_config_error(filename)
        try:
            return super().load_yaml_with_base(filename, allow_unsafe=False)
        except _UnknownBase as e:  # raised for a _BASE_ of this file
            raise ValueError(f"{filename}: _BASE_ {e}") from None

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        merge_yaml_file(self, cfg_filename)


def merge_yaml_file(cfg: SafeCfgNode, config_file: str) -> None:
    """``cfg.merge_from_file`` (Detectron2's, with ``_BASE_`` files read by
    :class:`SafeCfgNode`): a Python tag raises :func:`python_tag_error`, never runs."""
    import yaml
    from detectron2.config import CfgNode

    from .model_zoo import resolve_config_file

    if not isinstance(cfg, SafeCfgNode):
        raise TypeError(f"merge_yaml_file merges into a SafeCfgNode (SafeCfgNode(cfg)), not a {type(cfg).__name__}")
    config_file = resolve_config_file(config_file)  # acm_d2://NAME: a config of the package
    try:
        CfgNode.merge_from_file(cfg, config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise python_tag_error(config_file, e) from e


def get_acm_cfg(config_file: str = "", opts: Sequence[str] = ()):
    """Detectron2's config with the ACM keys, merged from a YAML file and ``KEY VALUE`` pairs.

    The YAML file (and every ``_BASE_`` it names, which may be ``acm_d2://NAME``) is read with
    ``yaml.safe_load`` only (:class:`SafeCfgNode`): a file with Python tags (``!!python/...``) is
    refused, never executed (Detectron2's own ``merge_from_file`` falls back to an unsafe loader). The registered names it uses are
    checked (:func:`check_registered_names`), and its periods (:func:`check_periods`).
    """
    cfg = get_cfg()
    add_acm_config(cfg)
    cfg = SafeCfgNode(cfg)
    if config_file:
        try:
            merge_yaml_file(cfg, config_file)
        except (KeyError, AssertionError) as e:
            _raise_if_unknown_key(cfg, e, f"{config_file}: ")
            raise
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:
        _raise_if_unknown_key(cfg, e, "the command line: ")
        raise
    check_registered_names(cfg)
    check_periods(cfg)
    return cfg


def _all_keys(node, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _raise_if_unknown_key(cfg, error: BaseException, where: str) -> None:
    """Turn yacs' "Non-existent (config) key: A.B.C" into a ValueError naming the key, the keys
    its section has, and where a key of that name is (e.g. MODEL.ACM.META_ARCHITECTURE:
    MODEL.META_ARCHITECTURE)."""
    text = str(error.args[0]) if error.args else ""
    if not text.startswith("Non-existent"):
        return
    full_key = text.rsplit(": ", 1)[-1]
    section, _, name = full_key.rpartition(".")
    node = cfg
    for part in section.split(".") if section else []:
        node = node.get(part) if isinstance(node, CN) else None
    message = f"{where}{full_key} is not a config key"
    if isinstance(node, CN):
        message += f"; {section or 'the top level'} has: {sorted(node)}"
    elsewhere = [k for k in _all_keys(cfg) if k.rpartition(".")[2] == name and k != full_key]
    if elsewhere:
        message += f". Did you mean {' or '.join(elsewhere[:3])}?"
    raise ValueError(message) from error


@dataclass
class ModelForInference:
    """What a tool needs to run a trained model on images.

    Attributes:
        model: the meta-architecture, in eval mode, on ``device``, with its weights loaded.
        augmentation: the test-time resize (a Detectron2 Augmentation), None if the config has none.
        input_format: "BGR" or "RGB".
        test_datasets: the config's test dataset names.
        weights: the file the weights came from ("" for none).
    """

    model: torch.nn.Module
    augmentation: Optional[object]
    input_format: str
    test_datasets: List[str]
    weights: str


def _is_lazy(config_file: str) -> bool:
    return str(config_file).endswith(".py")


def build_model_from_config_file(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None):
    """The model of a YAML config (``KEY VALUE`` overrides) or a LazyConfig ``.py`` file
    (``key=value`` overrides), without weights, on ``device`` (default: the config's)."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model

    from .model_zoo import resolve_config_file

    if _is_lazy(config_file):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(resolve_config_file(config_file)), list(opts))
        return instantiate(cfg.model).to(device or cfg.train.get("device", "cpu"))
    cfg = get_acm_cfg(config_file, list(opts) + (["MODEL.DEVICE", device] if device else []))
    return build_model(cfg)


def load_model_for_inference(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None) -> ModelForInference:
    """Build the model of a YAML or LazyConfig config and load its weights (MODEL.WEIGHTS /
    ``train.init_checkpoint``) with the safe checkpointer; a config asking for CUDA on a
    machine without it runs on the CPU (with a warning). Without weights, a warning says the
    model is randomly initialised."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import transforms as T

    from .engine.checkpointer import SafeCheckpointer
    from .model_zoo import resolve_config_file

    if _is_lazy(config_file):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(resolve_config_file(config_file)), list(opts))
        train = cfg.get("train", {})
        wanted, weights = device or train.get("device", "cpu"), train.get("init_checkpoint", "")
        augmentation, datasets = None, []
        if "dataloader" in cfg and "test" in cfg.dataloader:
            augmentation = T.AugmentationList(instantiate(cfg.dataloader.test.mapper.augmentations))
            names = cfg.dataloader.test.dataset.names
            datasets = [names] if isinstance(names, str) else list(names)
        model = instantiate(cfg.model)
        input_format = getattr(model, "input_format", "BGR")
    else:
        cfg = get_acm_cfg(config_file, opts)
        wanted, weights = device or cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS
        augmentation = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        input_format, datasets = cfg.INPUT.FORMAT, list(cfg.DATASETS.TEST)
        cfg.MODEL.DEVICE = "cpu"
        from detectron2.modeling import build_model

        model = build_model(cfg)
    if str(wanted).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("The config asks for device %s, which this machine does not have: running on the CPU", wanted)
        wanted = "cpu"
    if weights:
        SafeCheckpointer(model).load(weights)
    else:
        logger.warning("No weights given (MODEL.WEIGHTS / train.init_checkpoint): the model is randomly initialised")
    return ModelForInference(model.to(wanted).eval(), augmentation, input_format, datasets, weights)
