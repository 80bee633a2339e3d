"""tools/visualize_attention.py and acm_d2.visualization on a tiny random model."""
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from acm_d2 import ReferenceACM, acm_modules
from acm_d2.authors_layout import to_official_state_dict
from acm_d2.visualization import attention_on_image, kq_cosine, mask_overlap, rank_modules
from conftest import acm_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml"  # R-18 FPN, ACM in 8 blocks, G = 16
SIZE_OPTS = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


def run_tool(*args):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "visualize_attention.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "street.png"
    image = np.random.default_rng(0).integers(0, 256, size=(48, 72, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return path


@pytest.mark.slow
def test_tool_writes_grids_maps_and_ranking(tmp_path, image_file):
    out = tmp_path / "out"
    mask = np.zeros((48, 72), dtype=np.uint8)
    mask[8:30, 10:40] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    done = run_tool("--config-file", CONFIG, "--input", image_file, "--output", out,
                    "--block", "res4.1", "--mask", tmp_path / "mask.png", "--opts", "MODEL.DEVICE", "cpu", *SIZE_OPTS)
    assert done.returncode == 0, done.stderr
    assert "No weights given" in done.stderr  # a random model is said to be one
    picture = cv2.imread(str(out / "street_res4.1_attention.png"))
    # 16 groups, 4 per row -> 4 rows of 48 px; 4 groups x (K, Q) -> 8 columns of 72 px
    assert picture.shape == (4 * 48, 8 * 72, 3)
    maps = np.load(out / "street_res4.1_maps.npy")
    assert maps.shape[:2] == (16, 2)
    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)

    saved = json.loads((out / "summary.json").read_text())
    assert saved["block"] == "res4.1" and saved["groups"] == 16
    assert set(saved["mean_abs_cosine_kq"]) == {f"res{s}.{i}" for s in range(2, 6) for i in range(2)}
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in saved["mean_abs_cosine_kq"].values())
    ranking = saved["ranking_by_overlap"]
    assert len(ranking) == 8
    assert [r["overlap"] for r in ranking] == sorted((r["overlap"] for r in ranking), reverse=True)
    assert "mean |cos(K,Q)|" in done.stdout


@pytest.mark.slow
def test_tool_default_block_and_box(tmp_path, image_file):
    out = tmp_path / "out"
    done = run_tool("--config-file", CONFIG, "--input", image_file, "--output", out, "--box", "5", "5", "30", "40",
                    "--tile-size", "36", "--opts", "MODEL.DEVICE", "cpu", *SIZE_OPTS)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["block"] == "res5.1"  # the last module
    picture = cv2.imread(str(out / "street_res5.1_attention.png"))
    assert picture.shape == (4 * 24, 8 * 36, 3)  # tiles shrunk to a longest side of 36 px
    assert len(summary["ranking_by_overlap"]) == 8
    done = run_tool("--config-file", CONFIG, "--input", image_file, "--output", out, "--block", "res9.9",
                    "--opts", "MODEL.DEVICE", "cpu")
    assert done.returncode != 0 and "--block 'res9.9' is not an ACM module" in done.stderr


def test_library_maps_cosine_and_overlap():
    torch.manual_seed(0)
    model = build_model(acm_cfg(CONFIG, *SIZE_OPTS)).eval()
    modules = acm_modules(model)
    assert list(modules) == [f"res{s}.{i}" for s in range(2, 6) for i in range(2)]
    for module in modules.values():  # random biases: maps and cosines away from the init
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
    image = np.random.default_rng(1).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    mask = np.ones((40, 56), dtype=np.uint8)
    result = attention_on_image(model, image, mask=mask)
    assert result.image_size == (40, 56) and result.padded_size == (64, 64)
    for name, maps in result.maps.items():
        assert maps.shape[:2] == (modules[name].groups, 2)
        torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(maps.shape[:2]), atol=1e-5, rtol=0)
        # the whole image as mask: each map's mass over the image's part of the padded input
        assert torch.all(result.overlap[name] <= 1 + 1e-5)
    assert rank_modules([result])[0]["overlap"] <= 1 + 1e-5

    # kq_cosine against the paper's K and Q computed by the reference module
    module = modules["res3.1"]
    x = torch.randn(2, module.channels, 6, 5)
    reference = ReferenceACM(module.channels, module.groups)
    reference.load_state_dict({k[len("module."):]: v for k, v in to_official_state_dict(
        {f"context.{k}": v for k, v in module.state_dict().items()}).items()})  # zero map biases: exact
    mu = x.mean(dim=(2, 3), keepdim=True)
    k = reference.add_mod(x - mu).flatten(1)
    q = reference.sub_mod(x - mu).flatten(1)
    expected = (k * q).sum(1) / (k.norm(dim=1) * q.norm(dim=1))
    torch.testing.assert_close(kq_cosine(module, x), expected, atol=1e-5, rtol=1e-4)

    # uniform maps put exactly the mask's area fraction inside it
    uniform = torch.full((3, 2, 4, 4), 1.0 / 16)
    half = torch.zeros(16, 16)
    half[:, :8] = 1
    torch.testing.assert_close(mask_overlap(uniform, half), torch.full((3, 2), 0.5))
    assert math.isclose(float(mask_overlap(uniform, torch.ones(16, 16)).sum()), 6.0, rel_tol=1e-6)
