"""ACM's peers (NL, CC, GC, CBAM, SE): their equations, initialisation, placement, settings,
checkpoints, low precision, export paths, FLOP counts, and a module of the user's own."""
import re

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from torch import nn

import peer_equations as literal
from acm_d2.modeling import (
    CBAM,
    CONTEXT_MODULE_REGISTRY,
    CrissCrossAttention,
    GlobalContextBlock,
    NonLocalBlock,
    SqueezeExcitation,
    add_acm_flop_handles,
    context_modules,
)
from conftest import acm_cfg

TINY = "configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml"
PEERS = {"NL": NonLocalBlock, "CC": CrissCrossAttention, "GC": GlobalContextBlock, "CBAM": CBAM}


def randomised(module, std=0.3, seed=0):
    """``module`` in float64 with every parameter drawn at random (not its zero init)."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)
    return module.eval()


def params(module):
    return dict(module.named_parameters())


@pytest.mark.parametrize(
    "make, equation",
    [
        (lambda: NonLocalBlock(6, reduction=2), literal.non_local),
        (lambda: CrissCrossAttention(16, reduction=8, recurrence=2), lambda p, x: literal.criss_cross(p, x, 2)),
        (lambda: CrissCrossAttention(8, reduction=4, recurrence=1), lambda p, x: literal.criss_cross(p, x, 1)),
        (lambda: GlobalContextBlock(8, ratio=0.25), literal.global_context),
        (lambda: CBAM(8, reduction=2, kernel_size=7, norm=""), literal.cbam),
    ],
    ids=["NL", "CC-R2", "CC-R1", "GC", "CBAM"],
)
def test_peer_matches_its_equations(make, equation):
    module = randomised(make())
    x = torch.randn(2, module.channels, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = module(x)
    assert y.shape == x.shape
    for n in range(2):
        torch.testing.assert_close(y[n], equation(params(module), x[n]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["NL", "CC", "GC", "CBAM", "SE"])
def test_peer_gradients_are_exact(name):
    module = randomised(CONTEXT_MODULE_REGISTRY.get(name)(8, **{"NL": {"norm": ""}, "CBAM": {"norm": "", "reduction": 4},
                                                                  "SE": {"reduction": 4}}.get(name, {})))
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


@pytest.mark.parametrize("module", [NonLocalBlock(16), NonLocalBlock(64, norm="GN"), CrissCrossAttention(16),
                                    GlobalContextBlock(16)], ids=["NL", "NL-GN", "CC", "GC"])
def test_zero_initialised_peers_are_the_identity(module):
    x = torch.randn(2, module.channels, 5, 6)
    assert torch.equal(module.train()(x), x)
    # ... and learn: the zero-initialised part gets a gradient
    module(x).square().sum().backward()
    last = {NonLocalBlock: lambda m: m.out.norm.weight if m.out.norm is not None else m.out.weight,
            CrissCrossAttention: lambda m: m.gamma, GlobalContextBlock: lambda m: m.transform[-1].weight}[type(module)]
    assert last(module).grad.abs().sum() > 0


def test_initialisation_as_stated():
    gc = GlobalContextBlock(64)
    assert gc.transform[-1].weight.abs().sum() == 0 and gc.attention_logits.bias.abs().sum() == 0
    std = gc.attention_logits.weight.std().item()  # Kaiming normal, fan_in = 64: std sqrt(2 / 64)
    assert 0.7 * (2 / 64) ** 0.5 < std < 1.3 * (2 / 64) ** 0.5
    nl = NonLocalBlock(256)
    assert 0.008 < nl.theta.weight.std().item() < 0.012 and nl.out.weight.abs().sum() == 0
    assert nl.inner_channels == 128 and nl.theta.out_channels == 128
    cc = CrissCrossAttention(64)
    assert cc.query.out_channels == cc.key.out_channels == 8 and cc.value.out_channels == 64 and cc.gamma.item() == 0


def test_attention_maps_are_distributions():
    x = torch.randn(2, 16, 4, 5)
    nl = NonLocalBlock(16)
    assert nl.attention(x).shape == (2, 20, 20)
    torch.testing.assert_close(nl.attention(x).sum(-1), torch.ones(2, 20))
    cc = randomised(CrissCrossAttention(16)).float()
    a = cc.attention(x)
    assert a.shape == (2, 4, 5, 9)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 5))
    assert torch.all(a[:, torch.arange(4), :, torch.arange(4)] == 0)  # the pixel itself: counted once, in its row
    gc = GlobalContextBlock(16)
    torch.testing.assert_close(gc.attention(x).sum(dim=(-1, -2)), torch.ones(2, 1))


@pytest.mark.parametrize(
    "module, blocks",
    [
        ("SE", [f"res{s}.{i}.context" for s in (3, 4, 5) for i in range({3: 4, 4: 6, 5: 3}[s])]),
        ("GC", [f"res{s}.{i}.context" for s in (3, 4, 5) for i in range({3: 4, 4: 6, 5: 3}[s])]),
        ("CBAM", [f"res{s}.{i}.context" for s in (3, 4, 5) for i in range({3: 4, 4: 6, 5: 3}[s])]),
        ("NL", ["res4.4.context_after"]),
        ("CC", ["res4.4.context_after"]),
    ],
)
def test_placement_in_r50_and_imagenet_keys_unchanged(module, blocks, tmp_path):
    """The papers' Mask R-CNN placement, and an MSRA-layout R-50 loads with only the new keys missing."""
    plain_cfg = acm_cfg("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg = acm_cfg(f"configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_{module.lower()}.yaml")
    backbone = build_backbone(cfg)
    found = context_modules(backbone)
    assert list(found) == blocks and all(type(m) is CONTEXT_MODULE_REGISTRY.get(module) for m in found.values())
    plain_keys = set(build_backbone(plain_cfg).state_dict())
    keys = set(backbone.state_dict())
    assert plain_keys <= keys  # no Detectron2 parameter changes its name
    assert all(".context" in k for k in keys - plain_keys)
    # the FPN forward runs with the module in place (res3-res5 trained; NL/CC after res4.4)
    x = torch.randn(1, 3, 64, 64)
    assert backbone(x)["p5"].shape == (1, 256, 2, 2)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.ACM.MODULE", "NL", "MODEL.ACM.NL_REDUCTION", "0"], "NL: MODEL.ACM.NL_REDUCTION must be an integer in [1, channels]"),
        (["MODEL.ACM.MODULE", "NL", "MODEL.ACM.NL_NORM", "LN"], "NL: MODEL.ACM.NL_NORM must be one of ['', 'BN', 'SyncBN', 'GN'"),
        (["MODEL.ACM.MODULE", "CC", "MODEL.ACM.CC_REDUCTION", "0"], "CC: MODEL.ACM.CC_REDUCTION must be an integer in [1, channels]"),
        (["MODEL.ACM.MODULE", "CC", "MODEL.ACM.CC_RECURRENCE", "0"], "CC: MODEL.ACM.CC_RECURRENCE must be an integer >= 1 (paper: 2), got 0"),
        (["MODEL.ACM.MODULE", "GC", "MODEL.ACM.GC_RATIO", "1.5"], "GC: MODEL.ACM.GC_RATIO must be a number in (0, 1]"),
        (["MODEL.ACM.MODULE", "GC", "MODEL.ACM.GC_RATIO", "0.001"], "with ratio * channels >= 1 (channels=64"),
        (["MODEL.ACM.MODULE", "CBAM", "MODEL.ACM.CBAM_REDUCTION", "0"], "CBAM: MODEL.ACM.CBAM_REDUCTION must be an integer in [1, channels]"),
        (["MODEL.ACM.MODULE", "CBAM", "MODEL.ACM.CBAM_KERNEL_SIZE", "4"], "CBAM: MODEL.ACM.CBAM_KERNEL_SIZE must be an odd integer >= 1 (paper: 7), got 4"),
        (["MODEL.ACM.MODULE", "CBAM", "MODEL.ACM.CBAM_NORM", "GN"], "CBAM: MODEL.ACM.CBAM_NORM must be one of ['', 'BN', 'SyncBN', 'FrozenBN'"),
        (["MODEL.ACM.MODULE", "SE", "MODEL.ACM.SE_REDUCTION", "0"], "SE: MODEL.ACM.SE_REDUCTION must be an integer in [1, channels] = [1, 64], got 0"),
        (["MODEL.ACM.MODULE", "GC", "MODEL.ACM.AFTER_BLOCKS", "['res4.0']"], "MODEL.ACM.AFTER_BLOCKS ['res4.0'] places modules after blocks, but GC goes on the residual branch"),
        (["MODEL.ACM.MODULE", "NL", "MODEL.ACM.STAGES", "['res4']"], "MODEL.ACM.STAGES ['res4'] places modules on the residual branch, but NL goes after whole blocks"),
        (["MODEL.ACM.MODULE", "CC", "MODEL.ACM.AFTER_BLOCKS", "['res4.2']"], "MODEL.ACM.AFTER_BLOCKS has 'res4.2', but res4 has 2 blocks: i must be in -2..1"),
        (["MODEL.ACM.MODULE", "CC", "MODEL.ACM.AFTER_BLOCKS", "['res4-1']"], "MODEL.ACM.AFTER_BLOCKS has 'res4-1'; each entry is 'resS'"),
        (["MODEL.ACM.MODULE", "CC", "MODEL.ACM.AFTER_BLOCKS", "['res4', 'res4.1']"], "names block res4.1 more than once"),
        (["MODEL.ACM.MODULE", "NL", "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.ACM.AFTER_BLOCKS", "['res2.0']"],
         "MODEL.ACM.AFTER_BLOCKS has 'res2.0', but MODEL.BACKBONE.FREEZE_AT=2 freezes res2"),
        (["MODEL.ACM.MODULE", "NL", "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4']", "MODEL.FPN.IN_FEATURES",
          "['res2', 'res3', 'res4']", "MODEL.ACM.AFTER_BLOCKS", "['res5.0']"], "but this backbone has only the stages ['res2', 'res3', 'res4']"),
    ],
)
def test_bad_peer_settings_name_the_key_and_the_allowed_values(opts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_backbone(acm_cfg(TINY, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0", *opts))


@pytest.mark.parametrize(
    "module, opts, key, owners",
    [
        ("SE", ["MODEL.ACM.INIT", "identity"], "INIT 'identity'", "['ACM']"),
        ("CBAM", ["MODEL.ACM.INIT", "identity"], "INIT 'identity'", "['ACM']"),
        ("CBAM", ["MODEL.ACM.VARIANT", "PX"], "VARIANT 'PX'", "['ACM']"),
        ("none", ["MODEL.ACM.INIT", "identity"], "INIT 'identity'", "['ACM']"),
        ("ACM", ["MODEL.ACM.SE_REDUCTION", "4"], "SE_REDUCTION 4", "['SE']"),
        ("NL", ["MODEL.ACM.CC_RECURRENCE", "1"], "CC_RECURRENCE 1", "['CC']"),
    ],
)
def test_a_setting_the_module_does_not_have_is_refused(module, opts, key, owners):
    """A non-default value of a MODEL.ACM key that the chosen module does not read would be
    ignored: refused, naming the key, the module and the registered modules that read it."""
    cfg = acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0", *opts)
    shown = "MODEL.ACM.MODULE 'none' (no context module)" if module == "none" else f"MODEL.ACM.MODULE {module!r}"
    with pytest.raises(ValueError, match=re.escape(
            f"MODEL.ACM.{key} is a setting of the modules {owners}, which {shown} does not have: it would be "
            f"ignored. Leave MODEL.ACM.{key.split()[0]} at its default")):
        build_backbone(cfg)


@pytest.mark.parametrize("module", ["SE", "CBAM", "none"])
def test_default_settings_of_other_modules_are_accepted(module):
    """INIT, VARIANT at their defaults (given explicitly) and the ACM configs' GROUPS (16 in the
    synthetic R-18, sized to its backbone: ACM.IGNORABLE_KEYS) build any module."""
    cfg = acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0",
                  "MODEL.ACM.INIT", "authors", "MODEL.ACM.VARIANT", "P(X+(K-Q))")
    assert cfg.MODEL.ACM.GROUPS == 16
    found = context_modules(build_backbone(cfg))
    assert len(found) == (0 if module == "none" else 8)


def test_after_blocks_setting_places_units_anywhere():
    cfg = acm_cfg(TINY, "MODEL.ACM.MODULE", "CC", "MODEL.ACM.AFTER_BLOCKS", "['res3', 'res5.-1']", "MODEL.ACM.CC_RECURRENCE", "3")
    found = context_modules(build_backbone(cfg))
    assert list(found) == ["res3.0.context_after", "res3.1.context_after", "res5.1.context_after"]
    assert all(m.recurrence == 3 for m in found.values())


def test_block_runs_the_unit_after_its_add_and_relu():
    cfg = acm_cfg(TINY, "MODEL.ACM.MODULE", "NL")
    block = build_backbone(cfg).bottom_up.res4[0]
    randomised(block.context_after).float()
    block.eval()
    x = torch.randn(1, block.in_channels, 6, 6)
    shortcut = block.shortcut(x) if block.shortcut is not None else x
    plain = torch.relu(block.conv2(torch.relu(block.conv1(x))) + shortcut)
    torch.testing.assert_close(block(x), block.context_after(plain))


def test_checkpoints_of_earlier_versions_load_into_the_context_child():
    """acm-d2 < 0.3 named a block's module ``acm`` (or ``se``)."""
    for module in ("ACM", "SE"):
        model = build_backbone(acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"))
        state = {k.replace(".context.", ".acm." if module == "ACM" else ".se."): v + 1 for k, v in model.state_dict().items()}
        fresh = build_backbone(acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"))
        fresh.load_state_dict(state, strict=True)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, model.state_dict()[key] + 1), key


@pytest.mark.parametrize("source, target", [("SE", "ACM"), ("ACM", "SE"), ("NL", "CBAM"), ("CC", "none")])
def test_a_checkpoint_of_another_context_module_is_refused(source, target, tmp_path):
    """Its context keys (SE's ``...context.fc1.weight`` in an ACM model) would be dropped and the
    model's context modules keep their random initialisation: refused, naming both modules."""
    from acm_d2.engine import CheckpointLoadError, SafeCheckpointer

    def model(module):
        return build_backbone(acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"))

    path = tmp_path / f"{source}.pth"
    torch.save({"model": model(source).state_dict()}, path)
    SafeCheckpointer(model(source)).load(str(path))  # its own module: loads
    shown = "MODEL.ACM.MODULE 'none' (no context module)" if target == "none" else f"MODEL.ACM.MODULE {target!r}"
    with pytest.raises(CheckpointLoadError, match=re.escape(
            f"are the parameters of {source} modules, which this model ({shown}) does not have")) as info:
        SafeCheckpointer(model(target)).load(str(path))
    assert f"Build the model with MODEL.ACM.MODULE {source!r}" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_peers_under_autocast_keep_softmax_in_float32_and_stay_finite(dtype):
    torch.manual_seed(0)
    # realistic magnitudes: post-ReLU features with large per-channel means, trained-size weights
    x = (torch.randn(2, 64, 12, 16) * 4 + torch.rand(1, 64, 1, 1) * 20).relu()
    for name, cls in PEERS.items():
        module = cls(64)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_(0, 0.2)
        expected = module(x)
        with torch.autocast("cpu", dtype=dtype):
            if hasattr(module, "attention"):
                assert module.attention(x).dtype == torch.float32, name
            y = module(x)
        assert torch.isfinite(y).all(), name
        tolerance = 0.05 if dtype == torch.float16 else 0.1
        assert ((y.float() - expected).norm() / expected.norm()).item() < tolerance, name


def test_export_paths_match_eager_for_every_peer():
    """Tracing, torch.export (dynamic H, W) and torch.compile of all peers in a row."""
    torch.manual_seed(0)
    model = nn.Sequential(*[randomised(cls(16), std=0.2).float() for cls in PEERS.values()],
                          randomised(SqueezeExcitation(16)).float()).eval()
    x = torch.randn(2, 16, 6, 7)
    expected = model(x)
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=1e-5)
    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes={"input": {2: height, 3: width}})
    other = torch.randn(2, 16, 9, 5)
    torch.testing.assert_close(exported.module()(other), model(other), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


REGISTERED = sorted(name for name, _ in CONTEXT_MODULE_REGISTRY)  # every module MODEL.ACM.MODULE can name


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_module_scripts_and_matches_eager(name):
    """torch.jit.script of the module alone (NL and CC turned autocast off with a device
    that TorchScript refused: 'Autocast device argument must be a constant')."""
    torch.manual_seed(0)
    module = CONTEXT_MODULE_REGISTRY.get(name)(64).eval()
    with torch.no_grad():
        for parameter in module.parameters():  # not the zero init, which makes NL, CC, GC the identity
            parameter.normal_(0, 0.2)
    x = torch.randn(2, 64, 5, 7)
    scripted = torch.jit.script(module)
    with torch.no_grad():
        expected, got = module(x), scripted(x)
    assert not torch.equal(expected, x), name
    assert torch.equal(got, expected), name


@pytest.mark.parametrize("module", REGISTERED)
def test_flop_counts_cover_every_op_of_the_peers(module):
    """Detectron2's FlopCountAnalysis (as tools/analyze_model.py --tasks flop runs it) with
    acm-d2's handles finds no op of a context module it cannot count (ACM's sum of its maps'
    exponentials was 'Unsupported operator aten::sum', once per module)."""
    from detectron2.utils.analysis import FlopCountAnalysis

    cfg = acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0")
    model = build_model(cfg).eval()
    analysis = add_acm_flop_handles(FlopCountAnalysis(model, [{"image": torch.rand(3, 64, 64) * 255}]))
    analysis.unsupported_ops_warnings(False)
    by_module = analysis.by_module()
    peers = [name for name in by_module if name.endswith((".context", ".context_after"))]
    assert peers and all(by_module[name] > 0 for name in peers)
    peer_ops = set()
    for name in peers:
        peer_ops |= set(analysis.unsupported_ops(name))
    assert not peer_ops


def test_flop_handles_count_by_hand():
    """One add per input element for sum, mean; one comparison per input element for amax:
    ACM (C = 64, G = 32, N = 2, H x W = 6 x 7) sums and maxes its logits (N G, M + 1, H W) =
    (64, 3, 42) once each."""
    from fvcore.nn import FlopCountAnalysis

    class Reductions(nn.Module):
        def forward(self, x):  # (2, 3, 4, 5)
            return x.sum(dim=-1), x.mean(dim=(2, 3)), x.amax(dim=1)

    counts = add_acm_flop_handles(FlopCountAnalysis(Reductions(), (torch.randn(2, 3, 4, 5),))).by_operator()
    assert dict(counts) == {"sum": 120, "mean": 120, "amax": 120}
    analysis = add_acm_flop_handles(FlopCountAnalysis(CONTEXT_MODULE_REGISTRY.get("ACM")(64).eval(),
                                                      (torch.randn(2, 64, 6, 7),)))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analysis.by_operator()["sum"] == analysis.by_operator()["amax"] == 64 * 3 * 42
    assert "aten::sum" not in analysis.unsupported_ops()


def test_a_module_of_your_own_is_placed_by_config():
    @CONTEXT_MODULE_REGISTRY.register()
    class ChannelScale(nn.Module):
        PLACEMENT = "residual"
        CONFIG_KEYS = {"init": "SCALE_INIT"}

        def __init__(self, channels, init=1.0):
            super().__init__()
            self.scale = nn.Parameter(torch.full((1, channels, 1, 1), float(init)))

        def forward(self, x):
            return x * self.scale

    try:
        cfg = acm_cfg(TINY)
        cfg.MODEL.ACM.SCALE_INIT = 0.5
        cfg.merge_from_list(["MODEL.ACM.MODULE", "ChannelScale", "MODEL.ACM.STAGES", "['res3', 'res5']",
                             "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"])
        found = context_modules(build_backbone(cfg))
        assert list(found) == ["res3.0.context", "res3.1.context", "res5.0.context", "res5.1.context"]
        assert all(type(m) is ChannelScale and float(m.scale[0, 0]) == 0.5 for m in found.values())
        del cfg.MODEL.ACM["SCALE_INIT"]
        with pytest.raises(ValueError, match=re.escape("reads MODEL.ACM.SCALE_INIT, which the config does not have")):
            build_backbone(cfg)
    finally:
        CONTEXT_MODULE_REGISTRY._obj_map.pop("ChannelScale")
    with pytest.raises(ValueError, match=re.escape("PLACEMENT must be one of ['residual', 'after_block'], got None")):
        CONTEXT_MODULE_REGISTRY.register(type("NoPlacement", (nn.Module,), {"CONFIG_KEYS": {}}))


def _synthetic_trainer(output_dir, module, resume=False):
    """The built-in tiny data's config with ``module``, 2 iterations, a checkpoint after each."""
    from acm_d2.data import ensure_synthetic_dataset
    from acm_d2.engine import ResumableTrainer

    ensure_synthetic_dataset("acm_synthetic_tiny_train")
    cfg = acm_cfg(TINY, "MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0",
                  "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)",
                  "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                  "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
                  "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "3", "OUTPUT_DIR", str(output_dir))
    trainer = ResumableTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.parametrize("module", ["NL", "CC", "GC", "CBAM"])
def test_peer_trains_and_resumes_to_the_uninterrupted_weights(module, tmp_path):
    straight = tmp_path / "straight"
    _synthetic_trainer(straight, module)
    first = torch.load(straight / "model_0000000.pth", weights_only=True)["model"]
    final = torch.load(straight / "model_final.pth", weights_only=True)["model"]
    peer_keys = [k for k in final if ".context" in k]
    assert peer_keys and any(not torch.equal(first[k], final[k]) for k in peer_keys)  # the peer learns
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "model_0000000.pth").write_bytes((straight / "model_0000000.pth").read_bytes())
    (resumed / "last_checkpoint").write_text("model_0000000.pth")
    assert _synthetic_trainer(resumed, module, resume=True).start_iter == 1
    again = torch.load(resumed / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_lazy_config_takes_any_peer():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py")
    # on the command line, a new module's options replace ACM's whole dict
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.bottom_up.context_module=GC",
                                           "model.backbone.bottom_up.module_options=null"])
    cfg.model.backbone.bottom_up.module_options = {"ratio": 0.0625}
    found = context_modules(instantiate(cfg.model.backbone.bottom_up))
    assert len(found) == 13 and all(m.transform[0].out_channels == m.channels // 16 for m in found.values())
    cfg.model.backbone.bottom_up.context_module = "NL"
    cfg.model.backbone.bottom_up.module_options = {"reduction": 4}
    cfg.model.backbone.bottom_up.after_blocks = ["res4.-2", "res5.0"]
    found = context_modules(instantiate(cfg.model.backbone.bottom_up))
    assert list(found) == ["res4.4.context_after", "res5.0.context_after"]
    assert [m.inner_channels for m in found.values()] == [256, 512]


def test_attention_of_a_position():
    x = torch.randn(2, 16, 4, 5)
    nl = randomised(NonLocalBlock(16)).float()
    torch.testing.assert_close(nl.attention_of_position(x, 2, 3), nl.attention(x)[:, 2 * 5 + 3].view(2, 4, 5))
    cc = randomised(CrissCrossAttention(16)).float()
    maps = cc.attention_of_position(x, 1, 2)
    assert torch.all(maps[:, [0, 2, 3]][:, :, [0, 1, 3, 4]] == 0)  # only row 1 and column 2
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))
    cbam = CBAM(16).eval()
    assert ((cbam.attention_of_position(x, 0, 0) > 0) & (cbam.attention_of_position(x, 0, 0) < 1)).all()


@pytest.mark.parametrize("module", ["NL", "CC", "GC"])
def test_position_pictures_of_a_peer_model(module, tmp_path):
    import subprocess
    import sys

    import cv2
    import numpy as np

    from acm_d2.visualization import position_attention_on_image

    opts = ["MODEL.ACM.MODULE", module, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
    model = build_model(acm_cfg(TINY, *opts))
    for m in context_modules(model).values():
        randomised(m).float()
    image = np.random.default_rng(0).integers(0, 256, size=(48, 72, 3), dtype=np.uint8)
    from detectron2.data import transforms as T

    attention = position_attention_on_image(model, image, (60.0, 10.0), [T.ResizeShortestEdge(64, 96)])
    name = "res4.0.context_after" if module in ("NL", "CC") else "res5.1.context"
    assert name in attention.maps
    stride = 16 if module in ("NL", "CC") else 32  # res4, res5; the image is resized 48 -> 64 px high
    assert attention.feature_positions[name] == (int(10 * 64 / 48 / stride), int(60 * 96 / 72 / stride))
    torch.testing.assert_close(attention.maps[name].sum(), torch.tensor(1.0))
    if module != "NL":
        return
    # the tool, as a user runs it (random weights: only the pictures' existence and sizes are checked)
    path = tmp_path / "street.png"
    cv2.imwrite(str(path), image)
    done = subprocess.run([sys.executable, "tools/visualize_attention.py", "--config-file", TINY, "--input", str(path),
                           "--output", str(tmp_path / "out"), "--position", "60", "10", "--opts", *opts],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    picture = cv2.imread(str(tmp_path / "out" / "street_res4.0.context_after_attention.png"))
    assert picture.shape == (48, 72, 3)
    assert np.load(tmp_path / "out" / "street_res4.0.context_after_map.npy").shape == (4, 6)


#: The largest error under autocast over the float32 values' largest magnitude, of Y and of
#: dL/dX, for every module at the test's shapes (docs/peers.md, "Autocast", gives the figures).
AUTOCAST_TOLERANCE = {"bfloat16": (1e-2, 3e-2), "float16": (2e-3, 2e-2)}


@pytest.mark.parametrize("precision", sorted(AUTOCAST_TOLERANCE))
def test_every_module_under_autocast_stays_near_float32(precision):
    """X ~ N(0, 8^2) in ``precision`` (as the convolution before a module leaves it under AMP),
    the module under CPU autocast against itself in float32 on the same X and upstream gradient."""
    from acm_d2.benchmarks.peers import precision_errors

    rows = precision_errors({"wide": (64, 24, 32), "deep": (256, 12, 16)}, 2, torch.device("cpu"), precision)
    assert {r["module"] for r in rows} == set(REGISTERED)  # a registered module is measured (PEER_PLACES)
    bound_y, bound_grad = AUTOCAST_TOLERANCE[precision]
    for r in rows:
        assert r["finite"], r
        assert 0 < r["output_error"] <= bound_y and 0 < r["grad_error"] <= bound_grad, r
