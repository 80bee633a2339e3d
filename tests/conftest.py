"""Shared test helpers: tiny configs and models on CPU."""
import pytest
import torch

from acm_d2 import get_acm_cfg

torch.set_num_threads(2)


def acm_cfg(config_file="configs/Base-RCNN-FPN-ACM.yaml", *opts):
    """An unfrozen config with the ACM keys, merged from ``config_file`` and ``opts``, on CPU."""
    return get_acm_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts])


@pytest.fixture
def make_cfg():
    return acm_cfg
