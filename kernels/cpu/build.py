"""Compile ops.cpp into a torch extension on first use, or say why it cannot be had.

The build takes about a minute on two cores and is cached by torch in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later processes
load it in well under a second. A host without a C++ compiler (or ninja) gets None and
the engine keeps the torch reference ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ops.cpp")
# -march=native: the extension is built on, and cached for, the machine that runs it.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


def extension_name() -> str:
    """Named by the source's digest: checkouts with different kernels (two versions on
    one host, a downgrade) each keep their own build in the cache instead of rebuilding
    over one another."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()
    return f"jetserve_cpu_ops_{digest[:12]}"


def missing_toolchain() -> str | None:
    """What the build lacks on this host (a compiler, ninja), or None."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) on PATH"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed"
    return None


@functools.cache
def cpu_ops() -> Any:
    """``torch.ops.jetserve_cpu`` once the library is built and loaded, or None (logged
    once) when this host cannot build it."""
    why = missing_toolchain()
    if why is not None:
        log.warning("cpu kernels unavailable (%s); using the torch reference ops", why)
        return None
    from torch.utils.cpp_extension import load

    try:
        load(
            name=extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError) as e:  # a failed compile or link
        log.warning("cpu kernels failed to build (%s); using the torch reference ops", e)
        return None
    return torch.ops.jetserve_cpu
