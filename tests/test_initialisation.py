"""ACM inserted into a trained backbone (issue 20, docs/initialisation.md): MODEL.ACM.INIT
"identity" is exact and learns, the gains at initialisation behave as measured, and the
user's start (trained plain weights, ACM with the authors' init, FrozenBN, the COCO recipe
scaled to the batch) trains without diverging."""
import math
import runpy
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model

from acm_d2 import ACM, get_acm_cfg
from acm_d2.experiments import init_gain

REPO = Path(__file__).resolve().parents[1]
R18 = str(REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm.yaml")
TINY = [
    "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "MODEL.BACKBONE.FREEZE_AT", "2",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: 1 thread (2 threads on the busy 2-core machine make these 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", ["P(X+(K-Q))", "X+(K-Q)", "P(X+K)", "PX"])
def test_identity_init_is_exact_and_every_parameter_learns(variant):
    torch.manual_seed(0)
    acm = ACM(64, groups=8, variant=variant, init="identity")
    scale = acm.identity_input_scale
    assert scale == (1.0 if variant == "X+(K-Q)" else 2.0)
    x = (3 * torch.randn(2, 64, 5, 7) + torch.randn(2, 64, 1, 1)).requires_grad_(True)
    y = acm(x)
    assert torch.equal(y, x / scale)  # bit for bit: K - Q = 0 and P = 1/2 exactly
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # the backward: dY / scale up to float rounding (the K and Q terms cancel in a batched product)
    torch.testing.assert_close(x.grad, grad_y / scale, rtol=0, atol=1e-6)
    grads = {name: p.grad for name, p in acm.named_parameters()}
    if acm.kq_logits is not None:
        assert grads["kq_logits.weight"].abs().max() > 1e-3
        if variant in ("P(X+(K-Q))", "X+(K-Q)"):
            k_rows, q_rows = grads["kq_logits.weight"].view(8, 2, -1).unbind(1)
            # K and Q move apart (up to float rounding: the product kernel may sum the K and Q
            # rows of a batched product in different orders, as on AVX-512 MKL)
            torch.testing.assert_close(k_rows, -q_rows, rtol=1e-4, atol=1e-5 * float(k_rows.abs().max()))
    if acm.channel_gate is not None:
        assert grads["channel_gate.2.weight"].abs().max() > 1e-3 and grads["channel_gate.2.bias"].abs().max() > 1e-3
        # the first gate conv is behind the zero weight: nothing at step 0, something after one step
        assert grads["channel_gate.0.weight"].abs().max() == 0
    with torch.no_grad():
        for p in acm.parameters():
            p -= 0.1 * p.grad
    acm.zero_grad()
    y = acm(x.detach())
    assert (y - x.detach() / scale).abs().max() > 1e-3  # one step: no longer the identity
    y.backward(grad_y)
    if acm.channel_gate is not None:
        assert acm.channel_gate[0].weight.grad.abs().max() > 1e-4


def test_init_setting_is_checked():
    with pytest.raises(ValueError, match=r"MODEL\.ACM\.INIT must be one of \['authors', 'identity'\], got 'zeros'"):
        ACM(64, groups=8, init="zeros")
    cfg = get_acm_cfg(R18, ["MODEL.DEVICE", "cpu", "MODEL.ACM.INIT", "zeros"])
    with pytest.raises(ValueError, match=r"res2\.0.*MODEL\.ACM\.INIT must be one of"):
        build_backbone(cfg)


def test_gains_at_init_grow_with_the_spatial_std_not_with_channel_means():
    torch.manual_seed(0)
    rows = init_gain.sweep_feature_statistics(
        {"authors": lambda: ACM(64, 8), "identity": lambda: ACM(64, 8, init="identity")}, 64, 8, [0.1, 10.0], means=[0.0, 5.0]
    )
    gain = {(r["module"], r["sigma_set"], r["mean_set"]): r for r in rows}
    for key in ("white", "coherent", "top"):
        for sigma in (0.1, 10.0):
            assert gain[("identity", sigma, 0.0)][key] == pytest.approx(0.5, abs=1e-6)
    small, large = gain[("authors", 0.1, 0.0)], gain[("authors", 10.0, 0.0)]
    assert small["top"] < 1.0 and large["top"] > 20 * small["top"]  # the map logits' path: gain ~ sigma
    assert large["coherent"] > 5 * small["coherent"]
    assert large["flatness"] < 0.2 < 0.9 < small["flatness"]  # sharp maps at large sigma
    # channel means cancel in K - Q (mean-centred, and softmax ignores a constant shift); they
    # only reach P (through mu), a gain below 2
    assert gain[("authors", 10.0, 5.0)]["top"] == pytest.approx(large["top"], rel=0.15)
    assert gain[("authors", 10.0, 5.0)]["flatness"] == pytest.approx(large["flatness"], rel=1e-9)
    assert gain[("authors", 0.1, 5.0)]["top"] < 2


@pytest.fixture(scope="module")
def trained_plain(tmp_path_factory):
    """The plain R-18 trained for 8 steps with BN on the tiny built-in data, then FrozenBN
    (Detectron2's convert_frozen_batchnorm): (state dict, checkpoint path, training inputs)."""
    opts = TINY + ["MODEL.ACM.MODULE", "none", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0", "MODEL.RESNETS.NORM", "BN",
                   "MODEL.BACKBONE.FREEZE_AT", "0"]
    cfg = get_acm_cfg(R18, opts)
    inputs = init_gain.training_inputs(cfg, 16)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(8):
        batch = [inputs[(2 * step + i) % 16] for i in range(2)]
        loss = init_gain._loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("plain") / "plain.pth"
    torch.save({"model": state}, path)
    return state, path, inputs


def test_identity_backbone_equals_the_plain_one(trained_plain):
    state, path, inputs = trained_plain
    images = torch.stack([d["image"].float() for d in inputs[:2]])
    outputs = {}
    for label in ("plain", "ACM identity", "ACM authors"):
        cfg = get_acm_cfg(R18, TINY + ["MODEL.RESNETS.NORM", "FrozenBN"] + init_gain.module_overrides(label))
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(str(path))  # the user's path: only ACM keys are missing
        with torch.no_grad():
            outputs[label] = model.backbone(model.preprocess_image(inputs[:2]).tensor)
        if label == "ACM identity":
            # its own checkpoint (with ACM keys) loads without doubling the norms again
            again = build_model(cfg).eval()
            again.load_state_dict(model.state_dict())
            with torch.no_grad():
                repeat = again.backbone(again.preprocess_image(inputs[:2]).tensor)
            assert all(torch.equal(repeat[k], outputs[label][k]) for k in repeat)
    assert images.shape[0] == 2
    plain = outputs["plain"]
    assert all(torch.equal(outputs["ACM identity"][k], plain[k]) for k in plain)  # bit for bit, every level
    assert max(float((outputs["ACM authors"][k] - plain[k]).abs().max()) for k in plain) > 1e-2


def test_identity_bottleneck_backbone_equals_the_plain_one():
    """R-50 bottlenecks (13 ACMs, the COCO layout) with random FrozenBN affine and statistics."""
    base = str(REPO / "configs" / "Base-RCNN-FPN-ACM.yaml")
    cfg = get_acm_cfg(base, ["MODEL.DEVICE", "cpu", "MODEL.ACM.MODULE", "none", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"])
    torch.manual_seed(0)
    plain = build_backbone(cfg).eval()
    state = plain.state_dict()
    for key in state:
        if key.endswith(("norm.weight", "norm.bias", "running_mean")):
            state[key] = torch.randn_like(state[key]) * 0.5
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(state[key]) + 0.5
    plain.load_state_dict(state)
    identity = build_backbone(get_acm_cfg(base, ["MODEL.DEVICE", "cpu", "MODEL.ACM.INIT", "identity"])).eval()
    result = identity.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and all(".context." in k for k in result.missing_keys)
    assert len(init_gain.named_context_modules(identity)) == 13
    x = torch.randn(1, 3, 64, 64) * 40
    with torch.no_grad():
        want, got = plain(x), identity(x)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_users_start_trains_without_diverging(trained_plain):
    """Trained plain weights, ACM with the authors' init inserted, FrozenBN, the COCO recipe
    scaled to 2 images (LR 0.02 * 2 / 16, warmup factor 0.001, momentum 0.9, weight decay
    1e-4, no clipping): its first 2 warmup steps, then 2 steps at the full LR."""
    state, _, inputs = trained_plain
    opts = TINY + init_gain.coco_recipe(2)
    batch = inputs[:2]
    norms, losses = {}, {}
    for label in ("plain", "ACM identity", "ACM authors"):
        cfg = get_acm_cfg(R18, opts + ["MODEL.RESNETS.NORM", "FrozenBN"] + init_gain.module_overrides(label))
        assert cfg.SOLVER.BASE_LR == pytest.approx(0.0025) and cfg.SOLVER.WARMUP_ITERS == 8000
        model = init_gain.build_from_state(cfg, state)  # raises unless only context keys are missing
        torch.manual_seed(0)  # the same RPN / ROI sampling for each
        norms[label] = init_gain.backbone_gradient_norms(model, batch)["all"]
        if label == "ACM identity":  # the plain network's function: its gradients too
            assert norms[label] == pytest.approx(norms["plain"], rel=1e-5)
            continue
        rates = init_gain.warmup_learning_rates(cfg, 2) + [cfg.SOLVER.BASE_LR] * 2
        assert rates[0] == pytest.approx(0.0025 * 0.001)
        losses[label] = init_gain.first_steps(model, batch, rates, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY)
    acm = losses["ACM authors"]
    assert len(acm) == 5 and all(math.isfinite(v) for v in acm)
    assert max(acm) < 1.2 * acm[0] and acm[-1] < 0.95 * acm[0]  # no blow-up (the issue's: 1e8), it learns
    # the start had backbone gradients 1e3-1e4 x plain's; here ACM's are of plain's order
    assert norms["ACM authors"] < 2 * norms["plain"]


def test_measure_tool_writes_tables_and_figures(tmp_path):
    tool = runpy.run_path(str(REPO / "tools" / "measure_init_gain.py"), run_name="measure_init_gain")
    result = tool["main"](["--scenarios", "sweep", "--quick", "--output-dir", str(tmp_path)])
    md = (tmp_path / "init_gain.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    peers = [p for p in init_gain.PEERS if p in {getattr(c, "NAME", c.__name__) for c in init_gain.context_module_types()}]
    assert rows == ["module"] + [m for m in ["ACM authors", "ACM identity", *peers] for _ in range(2)]
    assert (tmp_path / "init_gain_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    identity = [r for r in result["results"]["sweep"] if r["module"] == "ACM identity"]
    assert all(r["top"] == pytest.approx(0.5, abs=1e-6) for r in identity)
    with pytest.raises(SystemExit, match="unknown scenarios"):
        tool["main"](["--scenarios", "sweep,bogus", "--output-dir", str(tmp_path)])


def test_identity_without_a_norm_scales_the_last_conv():
    """NORM "": the last conv before ACM is doubled instead of a norm."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "", "MODEL.BACKBONE.FREEZE_AT", "0"]
    torch.manual_seed(0)
    plain = build_backbone(get_acm_cfg(R18, opts + init_gain.module_overrides("plain"))).eval()
    identity = build_backbone(get_acm_cfg(R18, opts + init_gain.module_overrides("ACM identity"))).eval()
    result = identity.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == [] and len(result.missing_keys) == 8 * 5  # 8 ACMs, 5 tensors each
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = plain(x), identity(x)
    assert all(torch.equal(got[k], want[k]) for k in want)
