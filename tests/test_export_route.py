"""Detectron2's own export route for ACM models, on the COCO R-50 configs: what its
tests/test_export_torchscript.py (TestScripting) and tests/modeling/test_backbone.py
(test_resnet_scriptability) do, with acm-d2's configs, and more: scripted and traced ACM
models run the same fused computation as eager ones, so their outputs are equal, not only
within Detectron2's tolerances.
"""
import torch
from detectron2.export import scripting_with_instances
from detectron2.export.torchscript_patch import patch_nonscriptable_classes
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes
from detectron2.utils.testing import assert_instances_allclose, convert_scripted_instances

from acm_d2 import ACMGeneralizedRCNN, ACMRetinaNet, acm_modules
from export_cases import R50_MASK_RCNN, R50_RETINANET, FeaturesAsTuple, coco_backbone, coco_model, image

RCNN_FIELDS = {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor, "pred_boxes": Boxes,
               "scores": torch.Tensor, "pred_classes": torch.Tensor, "pred_masks": torch.Tensor}


def test_scripting_with_instances_then_inference_mask_rcnn_r50():
    # 300 proposals and 20 detections per image: the mask head's cost is per detection
    model = coco_model(R50_MASK_RCNN, "MODEL.RPN.POST_NMS_TOPK_TEST", "300", "TEST.DETECTIONS_PER_IMAGE", "20")
    assert type(model) is ACMGeneralizedRCNN and len(acm_modules(model)) == 13
    children = dict(model.named_children())
    scripted = scripting_with_instances(model, RCNN_FIELDS)
    # the model is left as it was: same class, same children (scripting compiled a view of it)
    assert type(model) is ACMGeneralizedRCNN and dict(model.named_children()) == children
    assert scripted.original_name == "GeneralizedRCNN"  # TorchScript compiled the meta-architecture
    inputs = [{"image": image(160, 224)}] * 2
    with torch.no_grad():
        expected = model.inference(inputs, do_postprocess=False)[0]
        got = scripted.inference(inputs, do_postprocess=False)[0]
    assert len(expected) == 20 and float(expected.scores.max()) > 0.5
    assert_instances_allclose(expected, got)  # Detectron2's tolerance (rtol 1e-5 of the magnitude)
    assert_equal_fields(expected, got, ["pred_boxes", "scores", "pred_classes", "pred_masks"])


def test_scripting_with_instances_retinanet_r50():
    model = coco_model(R50_RETINANET)
    assert type(model) is ACMRetinaNet
    with torch.no_grad():  # spread-out class scores (a random head gives them all at its prior, 0.01)
        model.head.cls_score.weight.mul_(3.0)
        model.head.cls_score.bias.zero_()
    scripted = scripting_with_instances(model, {"pred_boxes": Boxes, "scores": torch.Tensor,
                                                "pred_classes": torch.Tensor})
    img = image(128, 192)
    inputs = [{"image": img}] * 2
    with torch.no_grad():
        expected = model(inputs)[0]["instances"]
        got = detector_postprocess(convert_scripted_instances(scripted(inputs)[0]), img.shape[1], img.shape[2])
    assert len(expected) == 100 and float(expected.scores.max()) > 0.5
    assert_instances_allclose(expected, got)
    assert_equal_fields(expected, got, ["pred_boxes", "scores", "pred_classes"])


def test_traced_and_scripted_acm_backbone():
    """The ACM R-50 FPN backbone (test_resnet_scriptability, which asserts torch.allclose):
    traced and scripted outputs equal eager ones bit for bit."""
    patch_nonscriptable_classes()
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    backbone = coco_backbone(R50_MASK_RCNN)
    features = FeaturesAsTuple(backbone)
    with torch.no_grad():
        expected = features(x)
        traced = torch.jit.trace(features, (x,), check_trace=False)
        for name, got, value in zip(features.names, traced(x), expected):
            assert torch.equal(got, value), name
        scripted = torch.jit.script(backbone)(x)
    for name, value in zip(features.names, expected):
        assert torch.equal(scripted[name], value), name


def assert_equal_fields(expected, got, names):
    for name in names:
        a, b = expected.get(name), getattr(got, name)
        assert torch.equal(getattr(a, "tensor", a), getattr(b, "tensor", b)), name
