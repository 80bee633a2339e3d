"""acm-d2: the Attend-and-Compare Module (ECCV 2020) for any Detectron2 project."""
from setuptools import find_packages, setup

setup(
    name="acm-d2",
    version="0.1.0",
    description="Attend-and-Compare Module (Kim et al., ECCV 2020) as a Detectron2 extension",
    packages=find_packages(include=["acm_d2", "acm_d2.*"]),
    python_requires=">=3.8",
    # Detectron2 is not on PyPI: install it first (see README / Makefile DETECTRON2_SPEC).
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "opencv-python-headless"],
)
