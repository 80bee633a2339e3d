"""ACM placement in Detectron2's ResNets: counts, shapes, parameter names, pretrained weights."""
import pickle
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from acm_d2 import ACM, ACMRecorder, SqueezeExcitation
from acm_d2.modeling.blocks import ContextBottleneckBlock
from acm_d2.modeling.resnet import ContextResNet
from conftest import acm_cfg

SMALL_RESNET = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.OUT_CHANNELS", "32"]


def build(*opts, backbone="build_resnet_fpn_acm_backbone"):
    cfg = acm_cfg("configs/Base-RCNN-FPN-ACM.yaml", "MODEL.BACKBONE.NAME", backbone, *SMALL_RESNET, *opts)
    return build_backbone(cfg, ShapeSpec(channels=3))


def acm_blocks(module):
    return sorted(name.rsplit(".context", 1)[0] for name, m in module.named_modules() if isinstance(m, ACM))


@pytest.mark.parametrize(
    "depth, freeze_at, stages, expected",
    [
        (50, 2, [], 13),  # the authors' placement: res3-res5 of R-50
        (50, 0, [], 16),  # the paper's count for all four stages
        (50, 2, ["res4"], 6),
        (101, 2, [], 4 + 23 + 3),
        (18, 0, [], 8),
        (34, 1, [], 16),
        (152, 3, [], 36 + 3),
    ],
)
def test_module_counts(depth, freeze_at, stages, expected):
    opts = ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.BACKBONE.FREEZE_AT", str(freeze_at), "MODEL.ACM.STAGES", str(stages)]
    if depth < 50:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.ACM.GROUPS", "16"]
    backbone = build(*opts)
    blocks = acm_blocks(backbone)
    assert len(blocks) == expected
    first_stage = int(stages[0][3]) if stages else freeze_at + 1
    assert all(int(b.split(".")[1][3]) >= max(first_stage, 2) for b in blocks)


def test_placement_after_last_conv_norm_before_shortcut():
    torch.manual_seed(0)
    backbone = build("MODEL.RESNETS.DEPTH", "50", "MODEL.ACM.STAGES", "['res3']").eval()
    block = backbone.bottom_up.res3[1]
    assert isinstance(block, ContextBottleneckBlock) and block.context_after is None
    x = torch.randn(1, 512, 8, 8)
    with torch.no_grad(), ACMRecorder() as recorder:
        out = block(x)
    with torch.no_grad():
        conv3_out = block.conv3(torch.relu(block.conv2(torch.relu(block.conv1(x)))))  # conv + norm
        expected = torch.relu(block.context(conv3_out) + x)
    assert len(recorder.calls) == 1 and recorder.calls[0].module is block.context
    torch.testing.assert_close(recorder.calls[0].input, conv3_out)
    torch.testing.assert_close(out, expected)


def test_acm_survives_replacing_conv3():
    """A tool that swaps conv3 (conv + BN fusion, quantization, pruning) keeps ACM: the block's
    forward calls it, not a hook on conv3."""
    backbone = build("MODEL.RESNETS.DEPTH", "50", "MODEL.ACM.STAGES", "['res3']").eval()
    block = backbone.bottom_up.res3[0]
    fused = torch.nn.Conv2d(128, 512, 1)
    block.conv3 = fused
    with torch.no_grad(), ACMRecorder() as recorder:
        block(torch.randn(1, 256, 8, 8))
    assert [c.module for c in recorder.calls] == [block.context]
    assert recorder.calls[0].input.shape == (1, 512, 4, 4)


def test_shapes_and_names_equal_the_plain_backbone():
    torch.manual_seed(0)
    acm = build("MODEL.RESNETS.DEPTH", "50").eval()
    plain = build("MODEL.RESNETS.DEPTH", "50", backbone="build_resnet_fpn_backbone").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out_acm, out_plain = acm(x), plain(x)
    assert {k: v.shape for k, v in out_acm.items()} == {k: v.shape for k, v in out_plain.items()}
    plain_keys = set(plain.state_dict())
    acm_keys = set(acm.state_dict())
    assert plain_keys <= acm_keys
    extra = acm_keys - plain_keys
    assert extra and all(".context." in k for k in extra)
    assert "bottom_up.res3.0.context.kq_logits.weight" in extra
    assert acm.output_shape() == plain.output_shape()


def test_resnext_and_retinanet_and_c4():
    retina = build("MODEL.RESNETS.NUM_GROUPS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
                   "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']", "MODEL.FPN.IN_FEATURES",
                   "['res3', 'res4', 'res5']", backbone="build_retinanet_resnet_fpn_acm_backbone")
    assert len(acm_blocks(retina)) == 13
    assert set(retina.output_shape()) == {"p3", "p4", "p5", "p6", "p7"}
    c4 = build("MODEL.RESNETS.OUT_FEATURES", "['res4']", backbone="build_resnet_acm_backbone")
    assert isinstance(c4, ContextResNet)
    assert len(acm_blocks(c4)) == 4 + 6  # res3, res4; res5 of C4 models is in the ROI heads
    assert c4(torch.randn(1, 3, 32, 32))["res4"].shape == (1, 1024, 2, 2)


def test_se_and_none_modules():
    se = build("MODEL.ACM.MODULE", "SE")
    assert sum(isinstance(m, SqueezeExcitation) for m in se.modules()) == 13
    assert not any(isinstance(m, ACM) for m in se.modules())
    none = build("MODEL.ACM.MODULE", "none")
    plain = build(backbone="build_resnet_fpn_backbone")
    assert set(none.state_dict()) == set(plain.state_dict())


def test_trained_parameters_only_in_unfrozen_stages():
    backbone = build("MODEL.BACKBONE.FREEZE_AT", "2")
    for name, p in backbone.named_parameters():
        if ".context." in name:
            assert p.requires_grad, name
        if name.startswith("bottom_up.res2") or name.startswith("bottom_up.stem"):
            assert not p.requires_grad, name


def _c2_name(d2_key):
    """Detectron2's name of a ResNet weight -> its name in the MSRA (Caffe2) R-50.pkl."""
    if d2_key.startswith("stem.conv1.norm."):
        return "res_conv1_bn_" + {"weight": "s", "bias": "b"}[d2_key.rsplit(".", 1)[1]]
    if d2_key == "stem.conv1.weight":
        return "conv1_w"
    stage, block, layer, rest = d2_key.split(".", 3)
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[layer]
    suffix = {"weight": "w", "norm.weight": "bn_s", "norm.bias": "bn_b"}[rest]
    return f"{stage}_{block}_{branch}_{suffix}"


@pytest.mark.parametrize("module", ["ACM", "SE", "NL", "CC", "GC", "CBAM"])
def test_msra_imagenet_weights_load_with_only_acm_missing(tmp_path, module):
    """An MSRA-format .pkl (Detectron2's R-50.pkl layout) loads through Detectron2's checkpointer
    into the backbone with ACM or a peer: only the module's own keys are missing."""
    torch.manual_seed(0)
    plain = build("MODEL.RESNETS.NORM", "FrozenBN", backbone="build_resnet_fpn_backbone").bottom_up
    blobs = {
        _c2_name(k): v.numpy()
        for k, v in plain.state_dict().items()
        if not k.endswith(("running_mean", "running_var"))
    }
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    torch.manual_seed(1)
    acm = build("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.ACM.MODULE", module).bottom_up
    acm_init = {k: v.clone() for k, v in acm.state_dict().items() if ".context" in k}
    checkpointer = DetectionCheckpointer(acm)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))  # what load() logs
    loaded = acm.state_dict()
    for k, v in plain.state_dict().items():
        if not k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(loaded[k], v, msg=k)
    for k, v in acm_init.items():
        torch.testing.assert_close(loaded[k], v, msg=k)  # ACM keeps its initialisation
    missing = set(incompatible.missing_keys)
    assert missing == set(acm_init) - {k for k in acm_init if k.endswith("num_batches_tracked")}
    if module == "ACM":
        assert len(missing) == 13 * 5  # kq_logits.weight, channel_gate.{0,2}.*
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.ACM.STAGES", "['res4', 'res4']"], "MODEL.ACM.STAGES lists ['res4'] more than once"),
        (["MODEL.BACKBONE.FREEZE_AT", "5"], "MODEL.BACKBONE.FREEZE_AT=5 freezes every stage of this backbone"),
        (["MODEL.ACM.STAGES", "['res2']"], "MODEL.ACM.STAGES asks for ['res2'], but MODEL.BACKBONE.FREEZE_AT=2 freezes them"),
        (["MODEL.ACM.STAGES", "['res6']"], "MODEL.ACM.STAGES has ['res6'], which this backbone does not have"),
        (["MODEL.ACM.MODULE", "XL"], "MODEL.ACM.MODULE must be one of ['ACM', 'CBAM', 'CC', 'GC', 'NL', 'SE', 'none'], got 'XL'"),
    ],
)
def test_placement_errors_name_the_setting(opts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(*opts)
