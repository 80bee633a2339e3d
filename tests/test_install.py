"""acm-d2 as a user installs it: sdist and wheel built from the checkout, the wheel installed
into a fresh folder next to torch and Detectron2, used from outside the repository.

The installed package must carry every config of configs/, resolve them by name
(acm_d2.model_zoo, ``acm_d2://NAME``), run the README's "Add ACM to your project", build
every shipped config, and train with its console script ``acm-d2-train-net``.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import detectron2
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def checkout_configs():
    root = REPO / "configs"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix in (".yaml", ".py") and "__pycache__" not in p.parts)


def readme_snippet(language: str) -> str:
    """The first ``language`` code block of the README's "Add ACM to your project" section."""
    section = (REPO / "README.md").read_text().split("## Add ACM to your project", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def isolated_env(target: Path, tmp_path: Path) -> dict:
    """``python -S`` with only the installed package, torch and Detectron2 on the path: no
    .pth files (so not the checkout's editable install), no checkout folder."""
    paths = [str(target), str(Path(torch.__file__).resolve().parents[1]),
             str(Path(detectron2.__file__).resolve().parents[1])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ACM_D2"))}
    env.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), OMP_NUM_THREADS="2", PYTHONNOUSERSITE="1",
               ACM_D2_DATA_CACHE=str(tmp_path / "data"), PYTHONDONTWRITEBYTECODE="1")
    return env


INSTALLED_CHECK = textwrap.dedent(
    """
    import json, sys, torch
    import acm_d2
    from acm_d2 import model_zoo
    from detectron2.config import CfgNode, instantiate
    from detectron2.modeling import build_model

    snippet, yaml_text = sys.argv[1], sys.argv[2]
    exec(snippet)  # the README's "Add ACM to your project": defines cfg
    assert "ACM" in cfg.MODEL
    # its YAML keys on the plain COCO R-50 Mask R-CNN give the ACM model
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.merge_from_other_cfg(CfgNode.load_cfg(yaml_text))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        readme_model = build_model(cfg)
    built = {}
    for name in model_zoo.list_configs():  # every shipped config, without weights
        config = model_zoo.get_config(name)
        with torch.device("meta"):
            if isinstance(config, CfgNode):
                config.MODEL.DEVICE = "meta"
                model = build_model(config)
            else:
                model = instantiate(config.model)
        built[name] = [type(model).__name__, sum(p.numel() for p in model.parameters())]
    try:
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yml")
    except ValueError as e:
        refused = str(e)
    print(json.dumps({"file": acm_d2.__file__, "version": acm_d2.__version__, "built": built, "refused": refused,
                      "readme_acm_modules": len(acm_d2.acm_modules(readme_model)), "readme_meta": type(readme_model).__name__}))
    """
)


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout(tmp_path):
    # a copy of what the package is built from: the build writes build/ and *.egg-info beside it
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("acm_d2", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=source,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (sdist,) = dist.glob("acm_d2-*.tar.gz")
    configs = checkout_configs()
    assert len(configs) > 20
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        in_sdist = {n[len(top) + 1:] for n in tar.getnames()}
    assert {f"configs/{c}" for c in configs} <= in_sdist

    # the wheel is built from the sdist: it has the configs only if the sdist has all it needs
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(sdist)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("acm_d2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    shipped = sorted(n[len("acm_d2/model_zoo/configs/"):] for n in names if n.startswith("acm_d2/model_zoo/configs/"))
    assert shipped == configs
    assert "acm-d2-train-net = acm_d2.train_net:invoke_main" in entry_points

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                              "--target", str(target), str(wheel)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"  # a folder outside the repository
    work.mkdir()
    env = isolated_env(target, tmp_path)
    check = subprocess.run([sys.executable, "-S", "-c", INSTALLED_CHECK, readme_snippet("python"), readme_snippet("yaml")],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(target.resolve())  # not the checkout's acm_d2
    assert result["version"] == re.search(r'__version__ = "(.+)"', (REPO / "acm_d2" / "__init__.py").read_text())[1]
    assert sorted(result["built"]) == configs  # every shipped config built a model
    assert result["built"]["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml"][0] == "ACMGeneralizedRCNN"
    assert result["built"]["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py"][0] == "ACMGeneralizedRCNN"
    assert result["readme_meta"] == "ACMGeneralizedRCNN" and result["readme_acm_modules"] == 13
    assert "Close names: ['COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml'" in result["refused"]

    # 2 iterations on the built-in data with the installed console script and a model-zoo name
    out = tmp_path / "out"
    script = target / "bin" / "acm-d2-train-net"
    train = subprocess.run(
        [sys.executable, "-S", str(script), "--config-file", "acm_d2://Synthetic/mask_rcnn_R_18_FPN_acm.yaml",
         "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)",
         "INPUT.MAX_SIZE_TRAIN", "64", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
         "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0", "MODEL.DEVICE", "cpu",
         "OUTPUT_DIR", str(out)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-4000:]
    assert f"acm-d2 {result['version']}" in train.stdout
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 1 and "loss_acm_orth" in metrics[-1]
    assert (out / "model_final.pth").is_file()
    assert not (work / "output").exists() and not any(work.iterdir())  # nothing written where it ran


def test_model_zoo_names_configs_and_models():
    from detectron2.config import CfgNode
    from omegaconf import DictConfig

    from acm_d2 import ACMGeneralizedRCNN, get_acm_cfg, model_zoo

    assert model_zoo.list_configs() == checkout_configs()
    name = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml"
    assert model_zoo.get_config_file(name) == str(REPO / "configs" / name) == model_zoo.resolve_config_file("acm_d2://" + name)
    assert model_zoo.resolve_config_file("my/own.yaml") == "my/own.yaml"
    cfg = model_zoo.get_config(name)
    assert isinstance(cfg, CfgNode) and cfg.MODEL.META_ARCHITECTURE == "ACMGeneralizedRCNN" and cfg.MODEL.ACM.GROUPS == 32
    assert get_acm_cfg("acm_d2://" + name).dump() == cfg.dump()
    assert isinstance(model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py"), DictConfig)
    model = model_zoo.get("Synthetic/mask_rcnn_R_18_FPN_acm.yaml", device="cpu")  # MODEL.WEIGHTS "": nothing to load
    assert type(model) is ACMGeneralizedRCNN and model.training
    with pytest.raises(ValueError, match=r"Close names: \['COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml'"):
        model_zoo.get_config_file("mask_rcnn_R_50_FPN_1x_acm.yaml")  # the folder left out
    with pytest.raises(ValueError, match="acm-d2 publishes no trained weights"):
        model_zoo.get_config(name, trained=True)
