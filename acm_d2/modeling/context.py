"""The context modules a ResNet block can host, by name, and where each goes.

One registry knows them all: ``CONTEXT_MODULE_REGISTRY`` (a Detectron2 :class:`Registry`).
``MODEL.ACM.MODULE`` names one of its entries, or "none" for the plain backbone. A registered
module is an ``nn.Module`` class with

* ``__init__(self, channels, **options)``: the module for a feature map of ``channels``
  channels; ``options`` are its keyword arguments (never a config);
* ``forward(x)``: (N, C, H, W) -> (N, C, H, W);
* ``PLACEMENT``: where a block calls it, one of :data:`PLACEMENTS`:

  - ``"residual"``: on the residual branch, after the block's last conv + norm and before
    the shortcut is added (SE, ACM, GC, CBAM: the placement of their papers);
  - ``"after_block"``: after the whole block, i.e. after its add and ReLU (NL, CC: one unit
    between two blocks, as their papers put it into Mask R-CNN);

* ``CONFIG_KEYS``: constructor keyword -> key of ``MODEL.ACM`` that sets it (e.g. SE:
  ``{"reduction": "SE_REDUCTION"}``); the YAML builders read them with
  :func:`context_module_options`. A key that the chosen module does not read, at a value
  other than its owner's constructor default, is refused (:func:`check_unread_settings`);
* optionally ``IGNORABLE_KEYS``: those of its keys that other modules may ignore at any value
  (ACM: ``("GROUPS",)``, which configs of ACM size to their backbone, e.g. 16 for R-18).

A module of your own, placed by config without editing acm-d2::

    from acm_d2.modeling import CONTEXT_MODULE_REGISTRY

    @CONTEXT_MODULE_REGISTRY.register()
    class ChannelScale(nn.Module):
        PLACEMENT = "residual"
        CONFIG_KEYS = {"init": "SCALE_INIT"}   # add cfg.MODEL.ACM.SCALE_INIT = 1.0 first

        def __init__(self, channels, init=1.0):
            super().__init__()
            self.scale = nn.Parameter(torch.full((1, channels, 1, 1), float(init)))

        def forward(self, x):
            return x * self.scale

and ``MODEL.ACM.MODULE: "ChannelScale"``. The registered name is the class attribute ``NAME``
when there is one (the built-in modules: "ACM", "SE", "NL", "CC", "GC", "CBAM"), else the
class name.
"""
import inspect
from typing import Any, Dict, List, Optional

from detectron2.utils.registry import Registry
from torch import nn

__all__ = [
    "CONTEXT_MODULE_REGISTRY",
    "PLACEMENTS",
    "build_context_module",
    "check_unread_settings",
    "context_module_class",
    "context_module_names",
    "context_module_options",
]

#: Where a block calls its context module (see the module docstring).
PLACEMENTS = ("residual", "after_block")


class _ContextModuleRegistry(Registry):
    """Detectron2's Registry, registering a class under its ``NAME`` attribute if it has one,
    and checking that it says where it goes and which config keys set it."""

    def register(self, obj: Any = None) -> Any:
        if obj is None:
            return lambda cls: self.register(cls)
        placement = getattr(obj, "PLACEMENT", None)
        if placement not in PLACEMENTS:
            raise ValueError(
                f"context module {obj.__name__}: the class attribute PLACEMENT must be one of {list(PLACEMENTS)}, "
                f"got {placement!r}"
            )
        if not isinstance(getattr(obj, "CONFIG_KEYS", None), dict):
            raise ValueError(
                f"context module {obj.__name__}: the class attribute CONFIG_KEYS must be a dict (constructor "
                f"keyword -> key of MODEL.ACM), e.g. {{}} for a module without settings"
            )
        self._do_register(getattr(obj, "NAME", obj.__name__), obj)
        return obj


CONTEXT_MODULE_REGISTRY = _ContextModuleRegistry("CONTEXT_MODULE")
CONTEXT_MODULE_REGISTRY.__doc__ = """
Context modules that ResNet blocks host, by the name used in MODEL.ACM.MODULE. Each is an
nn.Module class with PLACEMENT, CONFIG_KEYS and __init__(channels, **options).
"""


def context_module_names() -> List[str]:
    """The allowed values of MODEL.ACM.MODULE: every registered name (sorted), and "none"."""
    return sorted(name for name, _ in CONTEXT_MODULE_REGISTRY) + ["none"]


def context_module_class(name: str) -> type:
    """The class registered as ``name``; ValueError listing the allowed values otherwise."""
    if isinstance(name, str) and name in CONTEXT_MODULE_REGISTRY:
        return CONTEXT_MODULE_REGISTRY.get(name)
    raise ValueError(f"MODEL.ACM.MODULE must be one of {context_module_names()}, got {name!r}")


def context_module_options(acm_config) -> Dict[str, Any]:
    """The constructor keywords of the module named by ``acm_config.MODULE`` (the MODEL.ACM
    node of a config), read from the keys its ``CONFIG_KEYS`` names; {} for "none"."""
    if acm_config.MODULE == "none":
        return {}
    cls = context_module_class(acm_config.MODULE)
    missing = [key for key in cls.CONFIG_KEYS.values() if key not in acm_config]
    if missing:
        raise ValueError(
            f"MODEL.ACM.MODULE {acm_config.MODULE!r} reads MODEL.ACM.{missing[0]}, which the config does not have; "
            f"add it before merging the config (cfg.MODEL.ACM.{missing[0]} = default)"
        )
    return {keyword: acm_config[key] for keyword, key in cls.CONFIG_KEYS.items()}


def check_unread_settings(acm_config) -> None:
    """Raise ValueError if a key of ``acm_config`` (the MODEL.ACM node of a config) that some
    registered module reads (its ``CONFIG_KEYS``) but the module of ``acm_config.MODULE`` does
    not is set to a value other than its owner's constructor default: it would be ignored
    (e.g. INIT "identity" with SE). Keys in an owner's ``IGNORABLE_KEYS`` are not checked."""
    module = acm_config.MODULE
    read = set() if module == "none" else set(context_module_class(module).CONFIG_KEYS.values())
    owners: Dict[str, List[str]] = {}
    defaults: Dict[str, List[Any]] = {}
    ignorable = set()
    for name, cls in sorted(CONTEXT_MODULE_REGISTRY):
        parameters = inspect.signature(cls).parameters
        for keyword, key in cls.CONFIG_KEYS.items():
            owners.setdefault(key, []).append(name)
            default = parameters[keyword].default if keyword in parameters else inspect.Parameter.empty
            if key in getattr(cls, "IGNORABLE_KEYS", ()) or default is inspect.Parameter.empty:
                ignorable.add(key)  # no default to compare with
            defaults.setdefault(key, []).append(default)
    for key, names in owners.items():
        if key in read or key in ignorable or key not in acm_config or acm_config[key] in defaults[key]:
            continue
        shown = "MODEL.ACM.MODULE 'none' (no context module)" if module == "none" else f"MODEL.ACM.MODULE {module!r}"
        raise ValueError(
            f"MODEL.ACM.{key} {acm_config[key]!r} is a setting of the modules {names}, which {shown} does not have: "
            f"it would be ignored. Leave MODEL.ACM.{key} at its default {defaults[key][0]!r}, or choose one of "
            f"{names} in MODEL.ACM.MODULE"
        )


def build_context_module(
    name: str, channels: int, options: Optional[Dict[str, Any]] = None, where: str = "block"
) -> nn.Module:
    """``CONTEXT_MODULE_REGISTRY.get(name)(channels, **options)``. A setting the module
    refuses is re-raised as a ValueError that also names the block (``where``)."""
    cls = context_module_class(name)
    try:
        return cls(channels, **(options or {}))
    except TypeError as e:
        raise ValueError(
            f"{where}: {name} got options {sorted(options or {})}, but its constructor takes "
            f"(channels, {', '.join(cls.CONFIG_KEYS)}): {e}"
        ) from e
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
