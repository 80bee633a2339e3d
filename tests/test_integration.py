"""ACM models in Detectron2's tooling: DefaultPredictor, Visualizer, FLOP counting, tracing."""
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
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
            acm_flops = {k: v for k, v in per_module.items() if k.endswith(".acm")}
            assert len(acm_flops) == 8 and all(v > 0 for v in acm_flops.values())
            # the whole model (FPN, RPN, ROI heads) traces and counts too
            whole = count_flops(model, [{"image": image}])
            assert whole.total() > backbone_flops["ACM"]
            assert any(k.endswith("backbone.bottom_up.res4.0.acm") and v > 0 for k, v in whole.by_module().items())
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
