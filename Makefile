# Set-up, tests and the demo for acm-d2. Every target installs what it needs first.
#
#   make demo    generate the built-in data, train Mask R-CNN + ACM on it, evaluate, draw
#   make test    run the test suite
#   make gpu-check  on a GPU machine: CUDA tests, model, module and demo within a budget
#                (GPU_CHECK_ARGS, e.g. "--budget-s 300"; docs/benchmark.md, "On a GPU")
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

.PHONY: setup test demo benchmark gpu-check gpu-wheels gpu-check-offline clean-venv

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

GPU_CHECK_ARGS ?=
gpu-check: setup
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'kernels for', torch.cuda.get_arch_list())"
	$(PY) tools/gpu_check.py --output-dir output/gpu_check $(GPU_CHECK_ARGS)

# A GPU machine without a package index, whose python3 has a CUDA torch of its own (such as a
# lent cloud machine): `make gpu-wheels` on a machine with PyPI puts what acm-d2 needs besides
# torch, torchvision, numpy, OpenCV, matplotlib and pytest into GPU_WHEELS, for that machine's
# Python (GPU_PYTHON_VERSION); there, `make gpu-check-offline` installs them into a folder of
# their own and runs the check with its python3 (tools/gpu_check_offline.sh).
GPU_WHEELS ?= .whl
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)/detectron2
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS) pycocotools iopath yacs termcolor tabulate \
		"omegaconf>=2.1,<2.4" "hydra-core>=1.1" "setuptools<81" portalocker
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(GPU_WHEELS) fvcore antlr4-python3-runtime==4.9.3
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 \
		-d $(GPU_WHEELS)/detectron2 $(D2_SNAPSHOT)
	du -sh $(GPU_WHEELS)

gpu-check-offline:
	bash tools/gpu_check_offline.sh $(GPU_WHEELS) --output-dir output/gpu_check $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
