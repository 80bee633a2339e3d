"""The LazyConfig (Python) configs: load, save, instantiate, one training step with loss_acm_orth."""
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from acm_d2 import ACM, ACMGeneralizedRCNN, ACMResNet, ContextResNet, acm_modules

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # config file: (ACM modules in R-50, their first stage, the modules of loss_acm_orth)
    "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py": (13, "res3", "res5"),
    "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_100ep_LSJ_acm.py": (16, "res2", "all"),
}


def small(cfg):
    """Cheaper heads for a CPU training step; the backbone stays the config's R-50 + ACM."""
    model = cfg.model
    model.proposal_generator.pre_nms_topk = (200, 100)
    model.proposal_generator.post_nms_topk = (50, 50)
    model.proposal_generator.batch_size_per_image = 64
    model.roi_heads.batch_size_per_image = 16
    model.roi_heads.num_classes = 3
    model.roi_heads.box_head.conv_dims = []
    model.roi_heads.box_head.fc_dims = [64]
    model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=64)
    model.roi_heads.mask_head.conv_dims = [32, 32]
    # no ImageNet weights here: ImageNet's pixel std keeps a randomly initialised FrozenBN
    # ResNet's activations in range
    model.pixel_std = [57.375, 57.12, 58.395]
    return cfg


def tiny_batch(num_images=2, size=32):
    """Images of size x size px (32: the FPN's size divisibility) with one box and mask each."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for i in range(num_images):
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.tensor([[4.0 + i, 5.0, 20.0, 25.0 - i]]))
        instances.gt_classes = torch.tensor([i % 3])
        masks = torch.zeros(1, size, size, dtype=torch.bool)
        masks[0, 5:25, 4:20] = True
        instances.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, size, size), generator=generator).float()
        batch.append({"image": image, "height": size, "width": size, "instances": instances})
    return batch


@pytest.mark.parametrize("config_file", list(CONFIGS))
def test_lazy_config_trains_with_orth_loss(config_file):
    cfg = small(LazyConfig.load(str(ROOT / config_file)))
    assert cfg.model.orth_loss_weight == 0.1
    assert cfg.model.backbone.bottom_up.module_options.groups == 32
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert isinstance(model, ACMGeneralizedRCNN) and isinstance(model.backbone.bottom_up, ContextResNet)
    expected_count, first_stage, orth_loss_modules = CONFIGS[config_file]
    modules = acm_modules(model)
    assert len(modules) == expected_count and next(iter(modules)) == f"{first_stage}.0"
    assert all(m.groups == 32 for m in modules.values())
    assert model.orth_loss_modules == orth_loss_modules

    # what Detectron2's tools/lazyconfig_train_net.py does before training
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    instantiate(cfg.lr_multiplier)

    model.train()
    with EventStorage():  # the trainer's; the heads log to it
        losses = model(tiny_batch())
    assert "loss_acm_orth" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_acm_orth"].requires_grad
    optimizer.zero_grad()
    sum(losses.values()).backward()
    # res4 (2 x 2 positions at 32 px; res5's single position makes softmax constant)
    acm = modules["res4.5"]
    assert acm.kq_logits.weight.grad is not None and acm.kq_logits.weight.grad.abs().sum() > 0
    optimizer.step()


def test_lazy_config_save_round_trip(tmp_path):
    for config_file in CONFIGS:
        cfg = LazyConfig.load(str(ROOT / config_file))
        path = tmp_path / (Path(config_file).stem + ".yaml")
        LazyConfig.save(cfg, str(path))
        # Detectron2 falls back to a pickle next to it when the YAML cannot hold the config
        assert not os.path.exists(str(path) + ".pkl")
        text = path.read_text()
        assert "_target_: acm_d2.ACMGeneralizedRCNN" in text
        assert "_target_: acm_d2.ContextResNet" in text
        reloaded = LazyConfig.load(str(path))
        assert reloaded.model.orth_loss_weight == 0.1
        assert reloaded.model.backbone.bottom_up.freeze_at == cfg.model.backbone.bottom_up.freeze_at
    # the reloaded YAML instantiates the same model (checked for the 1x one: the faster of the two)
    reloaded.model.orth_loss_weight = 0.0
    model = instantiate(small(reloaded).model)
    assert sum(isinstance(m, ACM) for m in model.modules()) == 16
    with EventStorage():
        assert "loss_acm_orth" not in model.train()(tiny_batch())


def test_overrides_like_the_command_line():
    config_file = str(ROOT / "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py")
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(config_file),
        ["model.backbone.bottom_up.module_options.groups=16", "model.orth_loss_weight=0.5",
         "model.backbone.bottom_up.module_stages=[res5]", "model.backbone.bottom_up.module_options.variant='X+(K-Q)'"],
    )
    model = instantiate(small(cfg).model)
    modules = acm_modules(model)
    assert list(modules) == ["res5.0", "res5.1", "res5.2"]
    assert all(m.groups == 16 and m.variant == "X+(K-Q)" and m.channel_gate is None for m in modules.values())
    assert model.orth_loss_weight == 0.5


def test_configs_of_earlier_versions_keep_working():
    """acm-d2 < 0.3 named the backbone ACMResNet, with acm_stages / acm_groups / acm_variant."""
    config_file = str(ROOT / "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py")
    cfg = LazyConfig.load(config_file)
    old = cfg.model.backbone.bottom_up
    old._target_ = ACMResNet
    del old.context_module, old.module_options, old.module_stages
    old.acm_stages, old.acm_groups, old.acm_variant = ["res4"], 8, "X+(K-Q)"
    backbone = instantiate(old)
    modules = acm_modules(backbone)
    assert list(modules) == [f"res4.{i}" for i in range(6)]
    assert all(m.groups == 8 and m.variant == "X+(K-Q)" for m in modules.values())
