#!/usr/bin/env bash
# The GPU check on a machine without a package index that has its own python3 with a CUDA
# torch (and torchvision, numpy, OpenCV, matplotlib, pytest): installs the wheels that
# `make gpu-wheels` put into WHEELS (Detectron2's snapshot, fvcore, pycocotools, ...) into a
# folder of their own, then runs tools/gpu_check.py with that python3 and its torch.
#
#   bash tools/gpu_check_offline.sh WHEELS [tools/gpu_check.py options]
#
# PYTHON (default python3) names the interpreter; SITE (default /tmp/acm-d2-site) the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:?usage: bash tools/gpu_check_offline.sh WHEELS [gpu_check.py options]}
shift
python=${PYTHON:-python3}
site=${SITE:-/tmp/acm-d2-site}
rm -rf "$site"
"$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
# Detectron2's snapshot: its wheel is tagged cp310; without its compiled _C (built for another
# torch) and without its top-level tools/ package (which would shadow this checkout's).
"$python" -m pip install --quiet --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.10 \
    --target "$site/detectron2-snapshot" "$wheels"/detectron2/*.whl
rm -rf "$site"/detectron2-snapshot/detectron2/_C*.so "$site"/detectron2-snapshot/tools
export PYTHONPATH="$PWD:$site/detectron2-snapshot:$site${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import torch, numpy, detectron2, acm_d2; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'kernels for', torch.cuda.get_arch_list(), '| numpy', numpy.__version__, '| detectron2', detectron2.__version__)"
exec "$python" tools/gpu_check.py "$@"
