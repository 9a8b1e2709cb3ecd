"""Compile ops.cpp and its sibling kernels into a torch extension on first use, or say why it cannot be had.

The build takes about 20 s of CPU (minutes on a busy two-core box) and is kept under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), named by the source's
digest, so later processes load it in well under a second. A host without a C++
compiler (or ninja) gets None and the engine keeps the torch reference ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# One library: ops.cpp defines the op namespace, the others add fragments to it.
SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "ops.cpp",
        "decode_linear.cpp",
        "activation.cpp",
        "sampling.cpp",
        "qkv_cache.cpp",
        "decode_layer.cpp",
    )
]
# What the sources include from this folder: part of the code the build digest names.
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
# -march=native: the extension is built on, and cached for, the machine that runs it.
CFLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffp-contract=fast",
    # tree-shaped horizontal sums of vector reductions instead of lane-by-lane adds
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
]


def _cpu_flags() -> str:
    """The instruction sets of this CPU (Linux), so a cache shared by different machines
    never hands one a library built for another's."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def extension_name() -> str:
    """Named by the source's digest: checkouts with different kernels (two versions on
    one host, a downgrade) each keep their own build in the cache instead of rebuilding
    over one another."""
    built_for = " ".join(CFLAGS) + _cpu_flags()  # -march=native code runs where it was built
    code = b"".join(source.read_bytes() for source in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(code + built_for.encode()).hexdigest()
    return f"jetserve_cpu_ops_{digest[:12]}"


def missing_toolchain() -> str | None:
    """What the build lacks on this host (a compiler, ninja), or None."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) on PATH"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed"
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: ``TORCH_EXTENSIONS_DIR`` (torch's own variable),
    else ``~/.cache/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "jetserve"


def compile_library(name: str, sources: list[Path], build_directory: Path) -> None:
    """Compile `sources` with this package's flags into ``build_directory/name.so`` and
    load it (its ops register themselves)."""
    from torch.utils.cpp_extension import load

    load(
        name=name,
        sources=[str(source) for source in sources],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_directory),
        is_python_module=False,
        verbose=False,
    )


def _build(name: str, target: Path) -> None:
    """Compile into a private folder, then rename the library into place: a build that
    dies half way (a worker killed while starting) leaves no lock or partial file that
    would stall the next process, and concurrent builders never share a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        compile_library(name, SOURCES, staging)
        os.replace(staging / f"{name}.so", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def cpu_ops() -> Any:
    """``torch.ops.jetserve_cpu`` once the library is built (or found built) and loaded, or
    None (logged once) when this host cannot build it."""
    name = extension_name()
    target = cache_dir() / f"{name}.so"
    try:
        if target.is_file():
            torch.ops.load_library(str(target))
            return torch.ops.jetserve_cpu
    except OSError as e:  # a damaged file: build it again
        log.warning("cpu kernels at %s do not load (%s); rebuilding", target, e)
    why = missing_toolchain()
    if why is not None:
        log.warning("cpu kernels unavailable (%s); using the torch reference ops", why)
        return None
    log.info("building the cpu kernels (once per host and kernel version) into %s", target)
    try:
        _build(name, target)
    except (RuntimeError, OSError) as e:  # a failed compile or link
        log.warning("cpu kernels failed to build (%s); using the torch reference ops", e)
        return None
    return torch.ops.jetserve_cpu
