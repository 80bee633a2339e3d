"""Shared test helpers: tiny configs and models on CPU."""
import pytest
import torch
from detectron2.config import get_cfg

from acm_d2 import add_acm_config

torch.set_num_threads(2)


def acm_cfg(config_file="configs/Base-RCNN-FPN-ACM.yaml", *opts):
    """A frozen-free config with the ACM keys, merged from ``config_file`` and ``opts``."""
    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture
def make_cfg():
    return acm_cfg
