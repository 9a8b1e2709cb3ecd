"""Kernel tests run the Triton kernels in Triton's CPU interpreter unless told otherwise.

Triton reads TRITON_INTERPRET when it is imported, so this is set before anything here
imports it (``jetserve_kernels.triton_utils`` also defaults it on hosts without CUDA, for runs
where another test module imported the kernels first). On a GPU host,
``TRITON_INTERPRET=0 pytest tests/unit/kernels tests/integration/kernels`` runs the same
tests compiled on the device.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from jetserve_kernels.triton_utils import HAS_TRITON, interpreter_enabled

if not HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when the kernels are compiled, else the CPU for the interpreter."""
    if not interpreter_enabled() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
