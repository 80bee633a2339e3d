"""loss_acm_orth in the loss dict of the ACM meta-architectures, against the formulas."""
import re

import pytest
import torch
from detectron2.config import configurable
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from torch import nn

from acm_d2 import ACM, ACMRecorder, with_acm_orth_loss
from conftest import acm_cfg
from equations import literal_from_module

TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
    "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.ACM.GROUPS", "8", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3",
]
RCNN = "configs/Base-RCNN-FPN-ACM.yaml"
RETINANET = "configs/COCO-Detection/retinanet_R_50_FPN_1x_acm.yaml"


def tiny_batch(n=2, size=64, seed=0):
    torch.manual_seed(seed)
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 36.0], [20.0, 24.0, 60.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 8:36, 8:40] = True
        masks[1, 24:60, 20:60] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, size, size) * 255, "instances": inst, "sem_seg": torch.zeros(size, size).long()})
    return batch


def train_forward(model, batch):
    """The training loss dict, and the ACM calls seen (an outer recorder sees what ran)."""
    with EventStorage(), ACMRecorder() as recorder:
        losses = model(batch)
    return losses, recorder.calls


def paper_formula(model, calls, weight, stages=None):
    """lambda * |mean over samples of the sum over the modules' literal (K . Q) / C|, with the
    literal equations on every recorded input; ``stages``: the stages to keep (None: all)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, ACM)}
    per_sample = sum(
        literal_from_module(c.module, c.input.detach())[1]
        for c in calls
        if stages is None or names[c.module].split(".")[-3] in stages  # "backbone.bottom_up.res5.1.context"
    )
    return weight * per_sample.mean().abs()


@pytest.mark.parametrize("config, opts, meta_arch", [
    (RCNN, ["MODEL.MASK_ON", "True"], "ACMGeneralizedRCNN"),
    (RETINANET, [], "ACMRetinaNet"),
    (RCNN, ["MODEL.META_ARCHITECTURE", "ACMPanopticFPN", "MODEL.MASK_ON", "True", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SEM_SEG_HEAD.NORM", ""], "ACMPanopticFPN"),
])
@pytest.mark.parametrize("modules", ["all", "res5"])
def test_loss_entry_equals_formula(config, opts, meta_arch, modules):
    cfg = acm_cfg(config, *TINY, *opts, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.3", "MODEL.ACM.ORTH_LOSS_MODULES", modules)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert type(model).__name__ == meta_arch
    losses, calls = train_forward(model, tiny_batch())
    assert len(calls) == 8  # R-18, FREEZE_AT 0: 2 blocks in each of res2-res5
    expected = paper_formula(model, calls, 0.3, None if modules == "all" else ["res5"])
    torch.testing.assert_close(losses["loss_acm_orth"], expected.to(losses["loss_acm_orth"].dtype), atol=1e-7, rtol=1e-4)
    before = {name: dict(vars(m)).keys() for name, m in model.named_modules()}
    sum(losses.values()).backward()
    acm = next(m for m in model.modules() if isinstance(m, ACM))
    assert acm.kq_logits.weight.grad is not None
    assert {name: dict(vars(m)).keys() for name, m in model.named_modules()} == before  # nothing left on modules


def authors_objective(model, batch, weight):
    """A literal transcription of the authors' Detectron2 code: each block adds its (K.Q)/C to
    the running sum of its stage (``out, dp = block(x, dp)``), every stage starts from zero,
    the FPN passes on the sum of res5 only, and rcnn.py adds lambda * |mean over the batch|."""
    images = model.preprocess_image(batch).tensor
    resnet = model.backbone.bottom_up
    x = resnet.stem(images)
    for name, stage in zip(resnet.stage_names, resnet.stages):
        dp = torch.zeros(images.shape[0], dtype=torch.float64)
        for block in stage:
            out = block.conv2(torch.relu(block.conv1(x)))  # BasicBlock
            dp = dp + literal_from_module(block.context, out)[1].double()  # the running sum of this stage
            shortcut = x if block.shortcut is None else block.shortcut(x)
            x = torch.relu(block.context(out) + shortcut)
        sums = {"res5": dp} if name == "res5" else {}
    return weight * sums["res5"].mean().abs()


def test_res5_objective_is_the_authors_code():
    cfg = acm_cfg(RCNN, *TINY, "MODEL.MASK_ON", "True", "MODEL.ACM.ORTH_LOSS_MODULES", "res5")
    torch.manual_seed(0)
    model = build_model(cfg).train()  # BN normalises with the batch's statistics in both computations
    batch = tiny_batch()
    with torch.no_grad():
        expected = authors_objective(model, batch, 0.1)
    losses, _ = train_forward(model, batch)
    assert float(expected) > 1e-3
    assert abs(float(losses["loss_acm_orth"]) - float(expected)) <= 1e-5 * float(expected)


@pytest.mark.parametrize("opts", [
    ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],
    ["MODEL.KEYPOINT_ON", "True", "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "3"],
])
def test_other_rcnn_heads_keep_the_loss(opts):
    cfg = acm_cfg(RCNN, *TINY, *opts)
    model = build_model(cfg).train()
    batch = tiny_batch()
    if "MODEL.KEYPOINT_ON" in opts:
        for item in batch:
            item["instances"].gt_keypoints = Keypoints(torch.full((2, 3, 3), 20.0))
    losses, calls = train_forward(model, batch)
    assert "loss_acm_orth" in losses and len(calls) == 8


def test_pointrend_keeps_the_loss():
    from detectron2.projects.point_rend import add_pointrend_config

    cfg = acm_cfg(RCNN)
    add_pointrend_config(cfg)
    cfg.merge_from_list(TINY + [
        "MODEL.MASK_ON", "True", "MODEL.ROI_HEADS.NAME", "PointRendROIHeads", "MODEL.ROI_MASK_HEAD.NAME", "CoarseMaskHead",
        "MODEL.ROI_MASK_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "ROIAlignV2", "MODEL.ROI_MASK_HEAD.IN_FEATURES", "['p2']", "MODEL.POINT_HEAD.NUM_CLASSES", "3",
        "MODEL.POINT_HEAD.IN_FEATURES", "['p2']", "MODEL.POINT_HEAD.FC_DIM", "16", "MODEL.POINT_HEAD.TRAIN_NUM_POINTS", "49",
    ])
    losses, calls = train_forward(build_model(cfg).train(), tiny_batch())
    assert "loss_acm_orth" in losses and "loss_mask" in losses and len(calls) == 8


def test_absent_for_lambda_zero_and_in_eval():
    model = build_model(acm_cfg(RCNN, *TINY, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0")).train()
    losses, _ = train_forward(model, tiny_batch())
    assert "loss_acm_orth" not in losses and "loss_rpn_cls" in losses
    model = build_model(acm_cfg(RCNN, *TINY)).eval()
    with torch.no_grad():
        outputs = model(tiny_batch(1))
    assert isinstance(outputs, list) and "instances" in outputs[0]


class TwoPasses(nn.Module):
    """A meta-architecture of a user's own: two backbone passes over two batches."""

    @configurable
    def __init__(self, *, backbone):
        super().__init__()
        self.backbone = backbone

    @classmethod
    def from_config(cls, cfg):
        return {"backbone": build_backbone(cfg)}

    def forward(self, images):
        first, second = self.backbone(images[0]), self.backbone(images[1])
        return {"loss_features": sum(f.mean() for f in first.values()) + sum(f.mean() for f in second.values())}


class ReturnsATensor(TwoPasses):
    def forward(self, images):
        return super().forward(images)["loss_features"]


def test_users_meta_architecture_with_two_passes():
    cfg = acm_cfg(RCNN, *TINY, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.2", "MODEL.ACM.ORTH_LOSS_MODULES", "all")
    model = with_acm_orth_loss(TwoPasses)(cfg).train()
    assert type(model).__name__ == "ACMTwoPasses"
    images = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    losses, calls = train_forward(model, images)
    assert len(calls) == 16
    per_sample = [sum(literal_from_module(c.module, c.input.detach())[1] for c in calls[i * 8:(i + 1) * 8]) for i in (0, 1)]
    expected = 0.2 * torch.cat(per_sample).mean().abs()  # the mean over the 5 samples of both passes
    torch.testing.assert_close(losses["loss_acm_orth"], expected, atol=1e-7, rtol=1e-4)


def test_training_output_that_is_not_a_dict_is_an_error():
    model = with_acm_orth_loss(ReturnsATensor)(acm_cfg(RCNN, *TINY)).train()
    with pytest.raises(TypeError, match="ReturnsATensor.forward returned a Tensor; the mixin needs a meta-architecture whose "
                                        "training forward returns a dict of losses"):
        train_forward(model, [torch.randn(2, 3, 32, 32)] * 2)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.ACM.ORTH_LOSS_WEIGHT", "-0.1"], "MODEL.ACM.ORTH_LOSS_WEIGHT must be a finite number >= 0, got -0.1"),
    (["MODEL.ACM.ORTH_LOSS_WEIGHT", "1e999"], "MODEL.ACM.ORTH_LOSS_WEIGHT must be a finite number >= 0, got inf"),
    (["MODEL.ACM.MODULE", "SE"], "has no ACM module"),
    (["MODEL.ACM.VARIANT", "PX"], "the ACM variant ['PX'] has no K or no Q"),
    (["MODEL.ACM.ORTH_LOSS_MODULES", "res4"], "MODEL.ACM.ORTH_LOSS_MODULES must be one of ['all', 'res5'], got 'res4'"),
    (["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"], "MODEL.META_ARCHITECTURE 'GeneralizedRCNN' does not add it"),
    (["MODEL.RESNETS.OUT_FEATURES", "['res4']", "MODEL.BACKBONE.NAME", "build_resnet_acm_backbone",
      "MODEL.RPN.IN_FEATURES", "['res4']", "MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 64]]", "MODEL.ROI_HEADS.NAME", "Res5ROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", "['res4']",
      "MODEL.ACM.ORTH_LOSS_MODULES", "res5"], "needs ACM modules in res5, but this model has them in ['res2', 'res3', 'res4']"),
])
def test_settings_that_cannot_give_the_loss(opts, message):
    cfg = acm_cfg(RCNN, *TINY, *opts)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(cfg)
