"""The C++ CPU kernels are built (or loaded from torch's extension cache) once per session;
a host without a compiler or ninja skips these tests, as the engine falls back there."""

from __future__ import annotations

import pytest

from jetserve_kernels.cpu.build import missing_toolchain
from jetserve_kernels.cpu.ops import available

if missing_toolchain() is not None:
    pytest.skip(f"cannot build the CPU kernels: {missing_toolchain()}", allow_module_level=True)


@pytest.fixture(scope="session", autouse=True)
def built() -> None:
    assert available(), "the toolchain is there but the CPU kernels failed to build (see log)"
