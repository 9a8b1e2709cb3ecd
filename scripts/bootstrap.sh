#!/usr/bin/env bash
# Create .venv and install jetserve with its dev extras. torch goes in FIRST and pinned:
# a bare `torch` requirement with no torch installed would pull several GB of CUDA wheels.
# Override with TORCH_SPEC (e.g. a CUDA build on GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
# setuptools warns on every editable install of a package outside the root folder
# (jetserve_kernels lives in kernels/): true, and nothing a person running this can act on.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[dev]"
echo "jetserve installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
