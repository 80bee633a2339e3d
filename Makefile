# Set-up, tests and the demo for acm-d2. Every target installs what it needs first.
#
#   make demo    generate the built-in data, train Mask R-CNN + ACM on it, evaluate, draw
#   make test    run the test suite
#
# DETECTRON2_SPEC: pip spec to install Detectron2 from, for example
#   DETECTRON2_SPEC='git+https://github.com/facebookresearch/detectron2.git'
# When unset, the PyPI snapshot sal-detectron2==0.7.2 (upstream main of 2024-04-17) is
# unpacked without its compiled extension, which Mask R-CNN does not need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.acm-d2-installed
D2_SNAPSHOT := sal-detectron2==0.7.2
D2_TARGET := $(VENV)/detectron2-snapshot
DETECTRON2_SPEC ?=

.PHONY: setup test demo benchmark clean-venv

# onnx 1.23.2 and onnxruntime 1.32.0 (the ONNX export tests) install and run next to numpy<2
# (numpy 1.26.4 here), which the Detectron2 snapshot and pycocotools builds are pinned with.
# torch.onnx.export's default route (dynamo=True) needs onnxscript and onnx_ir: their metadata asks
# for numpy 2, so they are installed without dependencies (what they import is already there).

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet "numpy<2" "setuptools<81" fvcore iopath pycocotools \
		opencv-python-headless Pillow matplotlib termcolor yacs tabulate cloudpickle tqdm \
		tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" black packaging pytest \
		faster-coco-eval submitit simplejpeg onnx==1.23.2 onnxruntime==1.32.0
	$(PIP) install --quiet --no-deps onnxscript==0.7.2 onnx_ir==1.1.0
	@if [ -n "$(DETECTRON2_SPEC)" ]; then \
		echo "Installing Detectron2 from $(DETECTRON2_SPEC)"; \
		$(PIP) install --no-build-isolation "$(DETECTRON2_SPEC)"; \
	else \
		rm -rf $(D2_TARGET) && \
		$(PIP) install --quiet --no-deps --only-binary=:all: --python-version 3.10 \
			--target $(D2_TARGET) $(D2_SNAPSHOT) && \
		rm -rf $(D2_TARGET)/detectron2/_C*.so $(D2_TARGET)/tools && \
		$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'detectron2-snapshot.pth').write_text(str(pathlib.Path('$(D2_TARGET)').resolve()) + '\n')"; \
	fi
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import acm_d2, detectron2; print('acm_d2 ready with detectron2', detectron2.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py

benchmark: setup
	$(PY) tools/benchmark.py --threads 2 --json benchmark.json

clean-venv:
	rm -rf $(VENV)
