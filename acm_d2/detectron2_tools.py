"""Run one of Detectron2's own scripts with acm-d2 in place.

    python -m acm_d2.detectron2_tools PATH/TO/detectron2/tools/train_net.py --config-file \
        configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml [ARGS ...]

Detectron2's ``tools/train_net.py``, ``analyze_model.py``, ``benchmark.py``,
``deploy/export_model.py`` and ``demo/demo.py`` build their config with
``detectron2.config.get_cfg()``, which has no ``MODEL.ACM`` keys, so an ACM YAML config stops
at ``KeyError: Non-existent config key: MODEL.ACM``. This entry point imports acm_d2 (which
registers the ACM backbones and meta-architectures), makes ``get_cfg()`` return a config
with the ACM keys (:func:`acm_d2.add_acm_config`), makes Detectron2's ``FlopCountAnalysis``
count ACM's operations (:mod:`acm_d2.modeling.flops`), and then runs the script as
``python SCRIPT ARGS`` would (:func:`run_script`: the script's folder first on ``sys.path``, so
that e.g. ``demo/demo.py`` imports its sibling ``predictor.py``). LazyConfig scripts (``lazyconfig_train_net.py``) need none of
this; the ACM LazyConfigs import acm_d2 themselves.

Config files can be named ``acm_d2://NAME`` (a config shipped with acm-d2, see
:mod:`acm_d2.model_zoo`), also in the ``_BASE_`` of a YAML file. ``deploy/export_model.py --format onnx --export-method tracing``
calls ``torch.onnx.export(model, args, f)``, which traced the model with TorchScript when it
was written; since torch 2.9 that call defaults to ``dynamo=True`` (``torch.export``, and the
``onnxscript`` package). Here a call that does not choose ``dynamo`` traces, as the script
means. ``python -m acm_d2.detectron2_tools --version`` prints acm-d2's version.

The script also reads files as safely as acm-d2's own tools (docs/safety.md): YAML configs
with ``yaml.safe_load`` only (Detectron2's ``merge_from_file`` and ``LazyConfig.load`` would
construct the Python objects of a ``!!python/...`` tag), and weights with
:class:`acm_d2.engine.SafeCheckpointer` in place of ``DetectionCheckpointer`` (every file but
a ``.pkl`` with ``weights_only=True``, also when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set).
"""
import os
import runpy
import sys
from typing import Sequence

import torch
import detectron2.checkpoint
import detectron2.config
import detectron2.engine.defaults
import detectron2.utils.analysis
import yaml

from . import __version__
from .config import SafeCfgNode, add_acm_config, python_tag_error
from .model_zoo import resolve_config_file
from .modeling.flops import add_acm_flop_handles

__all__ = ["SafeCfgNode", "get_cfg_with_acm", "main", "onnx_export_by_tracing", "run_script"]

_detectron2_get_cfg = detectron2.config.get_cfg
_detectron2_lazy_load = detectron2.config.LazyConfig.load


def get_cfg_with_acm():
    """Detectron2's ``get_cfg()`` plus the keys of :func:`acm_d2.add_acm_config`, as a
    :class:`SafeCfgNode`."""
    cfg = _detectron2_get_cfg()
    add_acm_config(cfg)
    return SafeCfgNode(cfg)


def _safe_lazy_load(filename: str, keys=None):
    """``LazyConfig.load``, refusing a YAML file that only Detectron2's ``yaml.unsafe_load``
    can read (Python tags). ``.py`` LazyConfigs are programs and load as before."""
    filename = resolve_config_file(filename)
    if str(filename).endswith((".yaml", ".yml")):
        try:
            with open(filename) as f:
                yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            raise python_tag_error(filename, e) from e
    return _detectron2_lazy_load(filename, keys)


class FlopCountAnalysisWithACM(detectron2.utils.analysis.FlopCountAnalysis):
    """Detectron2's FlopCountAnalysis with the handles of ACM's operations."""

    def __init__(self, model, inputs):
        super().__init__(model, inputs)
        add_acm_flop_handles(self)


_torch_onnx_export = torch.onnx.export


def onnx_export_by_tracing(model, args=(), f=None, **kwargs):
    """``torch.onnx.export`` with ``dynamo=False`` (the TorchScript tracer) unless the call
    chooses: what Detectron2's ``export_model.py --export-method tracing`` means."""
    kwargs.setdefault("dynamo", False)
    return _torch_onnx_export(model, args, f, **kwargs)


def run_script(path: str, argv: Sequence[str] = ()) -> None:
    """Run the Python file ``path`` with arguments ``argv`` as ``python path *argv`` would: as
    ``__main__``, with ``__file__`` = ``path``, ``sys.argv`` = [path, *argv] and the script's
    folder first on ``sys.path`` (so that it imports its sibling files). ``sys.argv`` and
    ``sys.path`` are restored afterwards, and the modules imported from the script's folder
    are forgotten (another script's sibling of the same name is then imported afresh)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such script; give the path of one of Detectron2's scripts (.py)")
    folder = os.path.dirname(os.path.abspath(path))
    saved_argv, saved_path, known = sys.argv, list(sys.path), set(sys.modules)
    sys.argv = [path, *argv]
    sys.path.insert(0, folder)
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for name in set(sys.modules) - known:
            module_file = getattr(sys.modules[name], "__file__", None)
            if "." not in name and module_file and os.path.dirname(os.path.abspath(module_file)) == folder:
                del sys.modules[name]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        sys.stdout.write(f"acm-d2 {__version__}\n")
        return
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit(__doc__.split("\n\n")[1] + "\nerror: give the path of a Detectron2 script (.py) first")
    from .engine.checkpointer import SafeCheckpointer

    detectron2.config.get_cfg = get_cfg_with_acm
    detectron2.config.LazyConfig.load = staticmethod(_safe_lazy_load)
    # Scripts import it from detectron2.checkpoint; DefaultTrainer and DefaultPredictor use the
    # name in detectron2.engine.defaults.
    detectron2.checkpoint.DetectionCheckpointer = SafeCheckpointer
    detectron2.engine.defaults.DetectionCheckpointer = SafeCheckpointer
    detectron2.utils.analysis.FlopCountAnalysis = FlopCountAnalysisWithACM
    torch.onnx.export = onnx_export_by_tracing
    run_script(argv[0], argv[1:])


if __name__ == "__main__":
    main()
