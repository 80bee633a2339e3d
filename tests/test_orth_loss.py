"""loss_acm_orth in the loss dict of Detectron2's meta-architectures, against the formula."""
import pytest
import torch
from detectron2.utils.events import EventStorage
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from acm_d2 import ACM, attach_acm_orth_loss
from conftest import acm_cfg
from test_acm import literal_from_module

TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
    "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.ACM.GROUPS", "8", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3",
]


def tiny_batch(n=2, size=64):
    torch.manual_seed(0)
    batch = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 36.0], [20.0, 24.0, 60.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 8:36, 8:40] = True
        masks[1, 24:60, 20:60] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, size, size) * 255, "instances": inst})
    return batch


def expected_orth_loss(model, batch, weight):
    """Run the model while recording every ACM input; compute the authors' formula literally."""
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0].detach()))
        for m in model.modules() if isinstance(m, ACM)
    ]
    with EventStorage():
        losses = model(batch)
    for h in hooks:
        h.remove()
    per_sample = sum(literal_from_module(m, x)[1] for m, x in inputs.items())  # (N,)
    return losses, weight * per_sample.mean().abs(), len(inputs)


@pytest.mark.parametrize(
    "config, meta_arch",
    [("configs/Base-RCNN-FPN-ACM.yaml", "GeneralizedRCNN"), ("configs/COCO-Detection/retinanet_R_50_FPN_1x_acm.yaml", "RetinaNet")],
)
def test_loss_entry_equals_formula(config, meta_arch):
    opts = TINY + ["MODEL.MASK_ON", "True"] if meta_arch == "GeneralizedRCNN" else TINY
    cfg = acm_cfg(config, *opts, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.3")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert type(model).__name__ == meta_arch
    losses, expected, n_modules = expected_orth_loss(model, tiny_batch(), 0.3)
    assert n_modules == 8  # R-18, FREEZE_AT 0: 2 blocks in each of res2-res5
    assert "loss_acm_orth" in losses
    torch.testing.assert_close(losses["loss_acm_orth"], expected.to(losses["loss_acm_orth"].dtype), atol=1e-6, rtol=1e-4)
    sum(losses.values()).backward()
    acm = next(m for m in model.modules() if isinstance(m, ACM))
    assert acm.kq_logits.weight.grad is not None and acm.last_orthogonality is None


def test_absent_for_lambda_zero_and_in_eval():
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", *TINY, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0")
    model = build_model(cfg).train()
    with EventStorage():
        losses = model(tiny_batch())
    assert "loss_acm_orth" not in losses and "loss_rpn_cls" in losses
    assert all(not m.record_orthogonality for m in model.modules() if isinstance(m, ACM))
    assert not model._forward_hooks
    attach_acm_orth_loss(model, 0.1)
    attach_acm_orth_loss(model, 0.2)  # replaces, never doubles
    assert len(model._forward_hooks) == 1
    with EventStorage():
        assert "loss_acm_orth" in model(tiny_batch())
    with torch.no_grad():
        outputs = model.eval()(tiny_batch(1))
    assert isinstance(outputs, list) and "instances" in outputs[0]


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_bad_lambda(weight):
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", *TINY)
    cfg.MODEL.ACM.ORTH_LOSS_WEIGHT = weight
    with pytest.raises(ValueError, match="MODEL.ACM.ORTH_LOSS_WEIGHT must be a finite number >= 0"):
        build_model(cfg)


def test_loss_without_acm_modules_is_an_error():
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", *TINY, "MODEL.ACM.MODULE", "SE")
    with pytest.raises(ValueError, match="has no ACM module"):
        build_model(cfg)
