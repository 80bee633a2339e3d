"""acm-d2: the Attend-and-Compare Module (ECCV 2020) for any Detectron2 project.

The repository keeps its configs in ``configs/``; a built package (wheel, ``pip install .``)
carries a copy of every YAML and ``.py`` file there in ``acm_d2/model_zoo/configs/``, as
Detectron2 ships its own (see :mod:`acm_d2.model_zoo`). The sdist has ``configs/`` itself
(MANIFEST.in). An editable install (``pip install -e .``, what ``make setup`` does) reads
the checkout's ``configs/`` directly.
"""
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CONFIG_SUFFIXES = (".yaml", ".py")


def read_version() -> str:
    """``__version__`` of acm_d2/__init__.py, its one place (importing acm_d2 needs Detectron2)."""
    text = (HERE / "acm_d2" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise RuntimeError("acm_d2/__init__.py has no line __version__ = \"...\"")
    return match.group(1)


def config_files():
    """Every YAML and LazyConfig file under configs/, relative to it."""
    root = HERE / "configs"
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES
                  and "__pycache__" not in p.parts)


class BuildPyWithConfigs(build_py):
    """build_py that also copies configs/ into the built package as acm_d2/model_zoo/configs."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's configs/
        files = config_files()
        if not files:
            raise RuntimeError(f"no YAML or .py file under {HERE / 'configs'}: the package would ship no configs")
        target = Path(self.build_lib) / "acm_d2" / "model_zoo" / "configs"
        if target.exists():
            shutil.rmtree(target)  # configs removed from configs/ do not linger in the build
        for relative in files:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / "configs" / relative, target / relative)


setup(
    name="acm-d2",
    version=read_version(),
    description="Attend-and-Compare Module (Kim et al., ECCV 2020) as a Detectron2 extension",
    packages=find_packages(include=["acm_d2", "acm_d2.*"]),
    python_requires=">=3.8",
    # Detectron2 is not on PyPI: install it first (see README / Makefile DETECTRON2_SPEC).
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "opencv-python-headless", "simplejpeg"],
    cmdclass={"build_py": BuildPyWithConfigs},
    entry_points={"console_scripts": ["acm-d2-train-net = acm_d2.train_net:invoke_main"]},
)
