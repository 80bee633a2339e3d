"""ONNX export of ACM models, run by ONNX Runtime, against eager outputs at 800 x 1216.

The whole Mask R-CNN goes the way of Detectron2's ``tools/deploy/export_model.py --format
onnx --export-method tracing`` run through ``python -m acm_d2.detectron2_tools``. That
script is not part of Detectron2's pip package; the stand-in below does what its tracing
branch does for a GeneralizedRCNN (config, ``DetectionCheckpointer``, the sample image
resized as ``DefaultPredictor`` does, ``TracingAdapter`` and ``torch.onnx.export(model,
(image,), f)``), and also saves the image tensor it exported with.
"""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.export.flatten import flatten_to_tuple
from PIL import Image

from acm_d2 import acm_modules
from acm_d2.modeling import CONTEXT_MODULE_REGISTRY
from export_cases import FeaturesAsTuple, assert_close_to_magnitude, coco_backbone, coco_model, image, match_detections

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 800, 1216  # a COCO image at Detectron2's test size (short side 800)
DETECTIONS = 30  # per image (COCO: 100); the mask head, run 3 times here, costs per detection

EXPORT_MODEL = '''
import argparse, os
import numpy as np
import torch
import detectron2.data.transforms as T
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import detection_utils
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

parser = argparse.ArgumentParser()
for flag in ("--format", "--export-method", "--config-file", "--sample-image", "--output"):
    parser.add_argument(flag)
parser.add_argument("opts", nargs=argparse.REMAINDER)
args = parser.parse_args()
assert args.format == "onnx" and args.export_method == "tracing"
cfg = get_cfg()
cfg.merge_from_file(args.config_file)
cfg.merge_from_list(args.opts)
cfg.freeze()
model = build_model(cfg)
DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS)
model.eval()
original = detection_utils.read_image(args.sample_image, format=cfg.INPUT.FORMAT)
resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
image = torch.as_tensor(resize.get_transform(original).apply_image(original).astype("float32").transpose(2, 0, 1))


def inference(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


adapter = TracingAdapter(model, [{"image": image}], inference)
os.makedirs(args.output, exist_ok=True)
with open(os.path.join(args.output, "model.onnx"), "wb") as f:
    torch.onnx.export(adapter, (image,), f)
np.save(os.path.join(args.output, "image.npy"), image.numpy())
'''


def run_onnx(model_bytes, *inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})


def test_acm_backbone_onnx():
    """The R-50 FPN + ACM backbone (13 modules), exported with dynamic height and width at a
    small size: ONNX Runtime at 800 x 1216 within 1e-4 of each output's magnitude (traced ==
    eager bit for bit: test_export_route.py)."""
    backbone = coco_backbone()
    assert len(acm_modules(backbone)) == 13
    features = FeaturesAsTuple(backbone)
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(features, (torch.randn(1, 3, 256, 384),), f, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=features.names,
                          dynamic_axes={"image": {2: "height", 3: "width"}})
        x = torch.randn(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
        expected = features(x)
    graph = onnx.load_from_string(f.getvalue()).graph
    assert sum(node.op_type == "MatMul" for node in graph.node) >= 2 * 13  # each ACM's logits and pooling
    outputs = run_onnx(f.getvalue(), x.numpy())
    assert len(outputs) == len(expected) == 5
    for name, value, reference in zip(features.names, outputs, expected):
        assert_close_to_magnitude(value, reference.numpy(), 1e-4, name)


@pytest.mark.parametrize("name", sorted(name for name, _ in CONTEXT_MODULE_REGISTRY))
def test_every_registered_module_runs_in_onnx_runtime(name):
    """Each context module alone, exported (TorchScript-based exporter, dynamic H and W) and run
    by ONNX Runtime at another size: within 1e-4 of eager (CC's k == i mask once exported as
    EyeLike, which ONNX Runtime has no kernel for: 'NOT_IMPLEMENTED: EyeLike(9)')."""
    torch.manual_seed(0)
    module = CONTEXT_MODULE_REGISTRY.get(name)(64).eval()
    with torch.no_grad():
        for parameter in module.parameters():  # not the zero init, which makes NL, CC, GC the identity
            parameter.normal_(0, 0.2)
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (torch.randn(2, 64, 6, 7),), f, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {2: "height", 3: "width"}})
        x = torch.randn(2, 64, 9, 5, generator=torch.Generator().manual_seed(1))
        expected = module(x)
    assert not torch.equal(expected, x), name
    ops = {node.op_type for node in onnx.load_from_string(f.getvalue()).graph.node}
    assert "EyeLike" not in ops, name
    (got,) = run_onnx(f.getvalue(), x.numpy())
    assert_close_to_magnitude(got, expected.numpy(), 1e-4, name)


@pytest.mark.slow
def test_whole_mask_rcnn_through_export_model_onnx_tracing(tmp_path):
    model = coco_model("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml",
                       "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS))
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    sample = tmp_path / "sample.png"
    Image.fromarray(image(HEIGHT, WIDTH).permute(1, 2, 0).numpy().astype(np.uint8)).save(sample)
    script = tmp_path / "export_model.py"
    script.write_text(EXPORT_MODEL)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "acm_d2.detectron2_tools", str(script), "--format", "onnx", "--export-method", "tracing",
         "--config-file", "acm_d2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml",
         "--sample-image", str(sample), "--output", str(out), "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu",
         "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    exported = np.load(out / "image.npy")
    assert exported.shape == (3, HEIGHT, WIDTH)
    with torch.no_grad():
        instances = model.inference([{"image": torch.from_numpy(exported)}], do_postprocess=False)[0]
    expected, _ = flatten_to_tuple([{"instances": instances}])  # the order of the ONNX outputs
    got = run_onnx((out / "model.onnx").read_bytes(), exported)
    assert [o.shape for o in got] == [tuple(t.shape) for t in expected] and len(got) == 5
    boxes, scores = instances.pred_boxes.tensor.numpy(), instances.scores.numpy()
    classes, masks = instances.pred_classes.numpy(), instances.pred_masks.numpy()
    assert len(scores) == DETECTIONS and scores.max() > 0.5  # a full set of detections
    by_name = dict(zip(["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"], got))
    order = match_detections(boxes, classes, scores, by_name["pred_boxes"], by_name["pred_classes"], by_name["scores"],
                             rtol=1e-4)
    assert np.array_equal(by_name["image_size"], [HEIGHT, WIDTH])
    assert np.array_equal(by_name["pred_classes"][order], classes)
    assert_close_to_magnitude(by_name["scores"][order], scores, 1e-4, "scores")
    assert_close_to_magnitude(by_name["pred_boxes"][order], boxes, 1e-4, "boxes")
    assert_close_to_magnitude(by_name["pred_masks"][order], masks, 1e-4, "masks")
