"""The images install jetserve as a wheel (`pip install --no-deps .`), not from the source
tree: the wheel must carry every file a serving host needs, the CPU kernels' C++ sources
and headers among them (they are compiled there at first use), and no `kernels` package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from jetserve_kernels.cpu.build import HEADERS, SOURCES
from tests.support.deploy_files import REPO


def test_the_wheel_carries_the_cpu_kernel_sources(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("jetserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"jetserve_kernels/cpu/{path.name}" for path in [*SOURCES, *HEADERS]}
    assert len(needed) >= 8
    assert needed <= names, sorted(needed - names)
    tops = {name.split("/")[0] for name in names if not name.startswith("jetserve-")}
    assert tops == {"services", "engine_worker", "shared", "jetserve_kernels"}
