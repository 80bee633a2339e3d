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
``python SCRIPT ARGS`` would. LazyConfig scripts (``lazyconfig_train_net.py``) need none of
this; the ACM LazyConfigs import acm_d2 themselves.
"""
import runpy
import sys

import detectron2.config
import detectron2.utils.analysis

from .config import add_acm_config
from .modeling.flops import add_acm_flop_handles

__all__ = ["get_cfg_with_acm", "main"]

_detectron2_get_cfg = detectron2.config.get_cfg


def get_cfg_with_acm():
    """Detectron2's ``get_cfg()`` plus the keys of :func:`acm_d2.add_acm_config`."""
    cfg = _detectron2_get_cfg()
    add_acm_config(cfg)
    return cfg


class FlopCountAnalysisWithACM(detectron2.utils.analysis.FlopCountAnalysis):
    """Detectron2's FlopCountAnalysis with the handles of ACM's operations."""

    def __init__(self, model, inputs):
        super().__init__(model, inputs)
        add_acm_flop_handles(self)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit(__doc__.split("\n\n")[1] + "\nerror: give the path of a Detectron2 script (.py) first")
    detectron2.config.get_cfg = get_cfg_with_acm
    detectron2.utils.analysis.FlopCountAnalysis = FlopCountAnalysisWithACM
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
