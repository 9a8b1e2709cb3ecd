"""A CPU-only install without Triton, in a fresh interpreter (a subprocess)."""

from __future__ import annotations

import subprocess
import sys


def test_package_imports_without_triton() -> None:
    """CPU-only installs import the kernels and run the references; Triton refuses clearly."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from jetserve_kernels.triton_utils import HAS_TRITON
from jetserve_kernels.rms_norm import rms_norm_ref, rms_norm_triton
assert not HAS_TRITON
rms_norm_ref(torch.ones(2, 8), torch.ones(8), 1e-6)
try:
    rms_norm_triton(torch.ones(2, 8), torch.ones(8), 1e-6)
except RuntimeError as e:
    assert "needs Triton" in str(e), e
else:
    raise AssertionError("no error without triton")
from engine_worker.engine.attention.backend import select_backend
from jetserve_kernels.cpu.ops import available
assert select_backend("auto", torch.device("cpu")).name == ("cpu" if available() else "torch")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
