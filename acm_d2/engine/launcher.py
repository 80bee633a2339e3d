"""Detectron2's ``launch``, also for CPU training on machines that have GPUs.

Detectron2's workers use NCCL and ``torch.cuda.set_device`` whenever CUDA is available, and
gloo otherwise. CPU training (``MODEL.DEVICE cpu``) with several processes on a machine with
GPUs would then hand CPU tensors to NCCL. :func:`launch` hides the GPUs from the workers in
that case, so that Detectron2's own ``launch`` picks gloo; ``--num-gpus N`` is then the
number of CPU processes. Everything else is Detectron2's ``launch``.
"""
import logging
import os

import torch
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT

__all__ = ["launch"]

logger = logging.getLogger(__name__)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    device: str = "",
):
    """Detectron2's ``launch(main_func, num_gpus_per_machine, ...)``.

    Args:
        device: the model's device (``cfg.MODEL.DEVICE``). If it is "cpu", there are several
            processes and CUDA is available, the workers are started with
            ``CUDA_VISIBLE_DEVICES=""`` (restored afterwards), so they join with gloo.
    """
    world_size = num_machines * num_gpus_per_machine
    hide_gpus = device == "cpu" and world_size > 1 and torch.cuda.is_available()
    if not hide_gpus:
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
    logger.info("MODEL.DEVICE is cpu: starting %d CPU processes (gloo) with the GPUs hidden", num_gpus_per_machine)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
