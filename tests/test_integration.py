"""ACM models in Detectron2's tooling: DefaultPredictor, Visualizer, FLOP counting, and every
export path (tracing, scripting, torch.export, torch.compile) against eager outputs."""
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.structures import Boxes
from detectron2.utils.visualizer import Visualizer

from acm_d2 import ACM
from acm_d2.modeling.flops import add_acm_flop_handles
from conftest import acm_cfg

# The R-18 FPN + ACM model of the synthetic data set (8 modules, G = 16), at 64 px, with a
# score threshold of 0 so that a randomly initialised model still returns detections.
TINY = (
    "configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml",
    "MODEL.WEIGHTS", "",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    "TEST.DETECTIONS_PER_IMAGE", "5",
)


def tiny_image(seed=0, height=64, width=64):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def tiny_model(*opts):
    torch.manual_seed(0)
    return build_model(acm_cfg(*TINY, *opts)).eval()


def test_default_predictor_and_visualizer():
    cfg = acm_cfg(*TINY)
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    assert sum(isinstance(m, ACM) for m in predictor.model.modules()) == 8
    image = tiny_image(height=48, width=64)
    outputs = predictor(image)
    instances = outputs["instances"].to("cpu")
    assert instances.image_size == (48, 64)
    assert len(instances) > 0 and instances.has("pred_masks")
    visualizer = Visualizer(image[:, :, ::-1], MetadataCatalog.get("acm_synthetic_val"), scale=1.0)
    drawn = visualizer.draw_instance_predictions(instances).get_image()
    assert drawn.shape == (48, 64, 3) and drawn.dtype == np.uint8


def count_flops(model, inputs):
    """Detectron2's FlopCountAnalysis (keys prefixed "model.") with ACM's handles."""
    analysis = add_acm_flop_handles(FlopCountAnalysis(model, inputs))
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def test_flop_count_includes_acm():
    image = torch.as_tensor(tiny_image().transpose(2, 0, 1).astype("float32"))
    backbone_flops = {}
    for module, weight in (("ACM", "0.1"), ("none", "0.0")):
        model = tiny_model("MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", weight)
        with torch.no_grad():
            tensor = model.preprocess_image([{"image": image}]).tensor
        analysis = count_flops(model.backbone, tensor)
        backbone_flops[module] = analysis.total()
        if module == "ACM":
            per_module = analysis.by_module()
            acm_flops = {k: v for k, v in per_module.items() if k.endswith(".context")}
            assert len(acm_flops) == 8 and all(v > 0 for v in acm_flops.values())
            # the whole model (FPN, RPN, ROI heads) traces and counts too
            whole = count_flops(model, [{"image": image}])
            assert whole.total() > backbone_flops["ACM"]
            assert any(k.endswith("backbone.bottom_up.res4.0.context") and v > 0 for k, v in whole.by_module().items())
    assert backbone_flops["ACM"] - backbone_flops["none"] >= sum(acm_flops.values())


def test_tracing_adapter_matches_eager():
    model = tiny_model()
    traced_image = torch.as_tensor(tiny_image(1).transpose(2, 0, 1).astype("float32"))

    def inference(model, image):
        return model.inference([{"image": image}], do_postprocess=False)[0]

    adapter = TracingAdapter(model, traced_image, inference)
    adapter.eval()
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    for seed, size in ((2, (64, 64)), (3, (96, 64))):  # the traced size and another one
        test_image = torch.as_tensor(tiny_image(seed, *size).transpose(2, 0, 1).astype("float32"))
        with torch.no_grad():
            expected = inference(model, test_image)
            got = adapter.outputs_schema(traced(test_image))
        assert len(expected) > 0
        assert len(got) == len(expected)
        assert tuple(int(s) for s in got.image_size) == tuple(expected.image_size) == size
        torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(got.pred_classes, expected.pred_classes)
        torch.testing.assert_close(got.pred_masks, expected.pred_masks, atol=1e-4, rtol=1e-4)


def test_scripting_export_matches_eager():
    """What Detectron2's tools/deploy/export_model.py --export-method scripting does for a
    GeneralizedRCNN: script an adapter that calls model.inference."""
    model = tiny_model()
    fields = {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor, "pred_boxes": Boxes, "scores": torch.Tensor,
              "pred_classes": torch.Tensor, "pred_masks": torch.Tensor}

    class ScriptableAdapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.eval()

        def forward(self, inputs: Tuple[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
            instances = self.model.inference(inputs, do_postprocess=False)
            return [i.get_fields() for i in instances]

    scripted = scripting_with_instances(ScriptableAdapter(), fields)
    image = torch.as_tensor(tiny_image(1, 64, 96).transpose(2, 0, 1).astype("float32"))
    with torch.no_grad():
        got = scripted(({"image": image},))[0]
        expected = model.inference([{"image": image}], do_postprocess=False)[0]
    assert len(expected) > 0
    boxes = got["pred_boxes"]  # the scripted Instances hands out the box tensor
    torch.testing.assert_close(getattr(boxes, "tensor", boxes), expected.pred_boxes.tensor, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["scores"], expected.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["pred_masks"], expected.pred_masks, atol=1e-4, rtol=1e-4)


def test_torch_export_with_dynamic_height_and_width():
    backbone = tiny_model().backbone
    height, width = torch.export.Dim("height", min=2, max=32), torch.export.Dim("width", min=2, max=32)
    exported = torch.export.export(backbone, (torch.randn(1, 3, 128, 192),),
                                   dynamic_shapes={"x": {2: 32 * height, 3: 32 * width}})
    for shape in ((1, 3, 128, 192), (1, 3, 192, 96)):  # the example size and another one
        x = torch.randn(shape)
        with torch.no_grad():
            expected, got = backbone(x), exported.module()(x)
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_of_an_acm_matches_eager():
    """torch.compile (inductor) of the ACM of a model's block (the block's convolutions are
    Detectron2's): inference, and training through the fused Function."""
    acm = tiny_model().backbone.bottom_up.res4[0].context
    compiled = torch.compile(acm)
    x = torch.randn(2, acm.channels, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), acm.eval()(x), atol=1e-4, rtol=1e-4)
    acm.train()
    x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    acm(x_eager).square().sum().backward()
    grad_eager = acm.kq_logits.weight.grad.clone()
    acm.zero_grad()
    compiled(x_compiled).square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acm.kq_logits.weight.grad, grad_eager, atol=1e-4, rtol=1e-4)
