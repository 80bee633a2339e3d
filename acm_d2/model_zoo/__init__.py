"""acm-d2's configs by name, as :mod:`detectron2.model_zoo` offers Detectron2's.

A config's name is its path under the repository's ``configs/`` folder, e.g.
``"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml"``; ``acm_d2://`` in front of it
(``acm_d2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml``) names it wherever a
config *file* is expected: ``--config-file`` of ``acm-d2-train-net`` / ``tools/train_net.py``,
of Detectron2's scripts run through ``python -m acm_d2.detectron2_tools``,
:func:`acm_d2.get_acm_cfg`, and the ``_BASE_`` of a YAML file (:class:`acm_d2.config.SafeCfgNode`).

    from acm_d2 import model_zoo
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml")
    model = model_zoo.get("Synthetic/mask_rcnn_R_18_FPN_acm.yaml")

Where the files are: an installed package (wheel, ``pip install .``) carries a copy of every
YAML and ``.py`` file of ``configs/`` in ``acm_d2/model_zoo/configs/``, made by ``setup.py``
when the package is built; a checkout (and its editable install) reads ``configs/`` itself.
"""
import difflib
from pathlib import Path
from typing import List, Optional

__all__ = ["PREFIX", "configs_root", "get", "get_config", "get_config_file", "list_configs", "resolve_config_file"]

#: The prefix that names a config of this model zoo where a file path is expected.
PREFIX = "acm_d2://"
_SUFFIXES = (".yaml", ".py")


def configs_root() -> Path:
    """The folder that holds the configs: the package's copy, else the checkout's ``configs/``."""
    installed = Path(__file__).resolve().parent / "configs"
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "configs").is_dir() and (checkout / "setup.py").is_file():
        return checkout / "configs"
    raise FileNotFoundError(
        f"acm-d2's configs are missing: neither {installed} (the copy an installed package carries) nor a "
        f"checkout's configs/ exists; reinstall acm-d2 from a wheel or a clone (pip install .)"
    )


def list_configs() -> List[str]:
    """Every config name (YAML and LazyConfig), sorted."""
    root = configs_root()
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file()
        and "__pycache__" not in p.parts
    )


def get_config_file(name: str) -> str:
    """The path of the config ``name`` (relative to ``configs/``; ``acm_d2://`` in front is
    accepted). A name that is not a config raises ``ValueError`` listing the close names."""
    relative = name[len(PREFIX):] if name.startswith(PREFIX) else name
    names = list_configs()
    if relative not in names:
        base = relative.rsplit("/", 1)[-1]
        same_file_name = [n for n in names if n.rsplit("/", 1)[-1] == base]  # e.g. the folder was left out
        close = same_file_name + [n for n in difflib.get_close_matches(relative, names, n=5, cutoff=0.5)
                                  if n not in same_file_name]
        close = close[:5]
        raise ValueError(
            f"{name!r} is not a config of acm-d2's model zoo. Close names: {close or 'none'}. "
            f"Names are paths under configs/ (acm_d2.model_zoo.list_configs() lists all {len(names)})"
        )
    return str(configs_root() / relative)


def resolve_config_file(config_file: str) -> str:
    """``acm_d2://NAME`` -> the path of the model-zoo config NAME; any other path unchanged."""
    config_file = str(config_file)
    return get_config_file(config_file) if config_file.startswith(PREFIX) else config_file


def get_config(name: str, trained: bool = False):
    """The config of ``name``: a CfgNode with the ACM keys for a YAML file (read safely, see
    :func:`acm_d2.get_acm_cfg`), an omegaconf DictConfig for a LazyConfig ``.py`` file.

    ``trained=True`` asks for trained weights, as in Detectron2's model zoo; acm-d2 publishes
    none, so it raises ``ValueError`` saying how to use the authors' checkpoint instead.
    """
    path = get_config_file(name)
    if trained:
        raise ValueError(
            f"trained=True: acm-d2 publishes no trained weights for {name!r}; train one (acm-d2-train-net "
            f"--config-file {PREFIX}{name[len(PREFIX):] if name.startswith(PREFIX) else name}) or load the "
            f"authors' checkpoint with MODEL.WEIGHTS / train.init_checkpoint (docs/integration.md, section 5)"
        )
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from ..config import get_acm_cfg

    return get_acm_cfg(path)


def get(name: str, trained: bool = False, device: Optional[str] = None, load_weights: bool = True):
    """The model of config ``name`` in training mode, on ``device`` (default: the CPU when
    there is no CUDA), with the weights its config names (MODEL.WEIGHTS /
    ``train.init_checkpoint``, e.g. ImageNet for the COCO configs) loaded by the safe
    checkpointer unless ``load_weights`` is False. ``trained``: see :func:`get_config`."""
    import torch
    from detectron2.config import CfgNode, instantiate
    from detectron2.modeling import build_model

    from ..engine.checkpointer import SafeCheckpointer

    cfg = get_config(name, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if isinstance(cfg, CfgNode):
        if device is not None:
            cfg.MODEL.DEVICE = device
        model = build_model(cfg)
        weights = cfg.MODEL.WEIGHTS
    else:
        model = instantiate(cfg.model)
        if device is not None:
            model = model.to(device)
        weights = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
    if load_weights and weights:
        SafeCheckpointer(model).load(weights)
    return model
