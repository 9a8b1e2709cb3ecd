"""As in tests/unit/kernels/conftest.py: Triton's CPU interpreter unless told otherwise
(``TRITON_INTERPRET=0`` on a GPU host compiles on the device), a skip without Triton,
and the `device` the kernels run on."""

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
