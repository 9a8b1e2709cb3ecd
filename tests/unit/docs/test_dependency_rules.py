"""The dependency rules docs/architecture.md states, read from every import in the packages
(function-level imports included), so the picture a newcomer reads stays the code's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "services": ROOT / "services",
    "engine_worker": ROOT / "engine_worker",
    "shared": ROOT / "shared",
    "jetserve_kernels": ROOT / "kernels" / "jetserve_kernels",
}
ENGINE = ROOT / "engine_worker" / "engine"


def imported_tops(path: Path) -> set[str]:
    """The top-level names of what a file imports by absolute name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def offenders(folder: Path, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {sorted(imported_tops(path) & forbidden)}"
        for path in files_of(folder)
        if imported_tops(path) & forbidden
    ]


def test_the_packages_hold_python_files() -> None:
    """A moved folder would make every rule below pass on nothing."""
    for name, folder in PACKAGES.items():
        assert len(files_of(folder)) >= 5, name


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        # nothing imports services
        (PACKAGES["engine_worker"], {"services"}),
        (PACKAGES["shared"], {"services"}),
        (PACKAGES["jetserve_kernels"], {"services"}),
        # shared is what both sides agree on, so it depends on neither
        (PACKAGES["shared"], {"engine_worker", "jetserve_kernels"}),
        # the kernels are leaves: torch and Triton only
        (PACKAGES["jetserve_kernels"], {"engine_worker", "shared"}),
        # the engine runs in a thread or its own process: no NATS, no event loop
        (ENGINE, {"nats", "asyncio"}),
    ],
    ids=["worker-services", "shared-services", "kernels-services", "shared", "kernels", "engine"],
)
def test_imports_point_one_way(folder: Path, forbidden: set[str]) -> None:
    assert offenders(folder, forbidden) == []


def test_only_the_engine_imports_the_kernels() -> None:
    outside = [
        line
        for name in ("services", "shared")
        for line in offenders(PACKAGES[name], {"jetserve_kernels"})
    ]
    worker = [
        f"{path.relative_to(ROOT)}"
        for path in files_of(PACKAGES["engine_worker"])
        if ENGINE not in path.parents and "jetserve_kernels" in imported_tops(path)
    ]
    assert outside + worker == []
