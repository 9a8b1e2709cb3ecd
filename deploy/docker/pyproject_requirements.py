"""Print pyproject.toml's runtime dependencies as a requirements list, minus some.

Why: the API image must not carry torch (gigabytes it never imports) and no image needs
the bundled nats-server binary, yet the dependency list should live in one place only.
The Dockerfiles run this before copying the source, so the dependency layer is cached
until pyproject.toml changes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement string."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def select_requirements(
    pyproject: dict, *, without: set[str], only: set[str] | None, extras: list[str]
) -> list[str]:
    """Runtime dependencies plus the named extras, filtered by normalized name."""
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra named {extra!r}")
        requirements += optional[extra]
    drop = {requirement_name(n) for n in without}
    keep = {requirement_name(n) for n in only} if only is not None else None
    selected = []
    for req in requirements:
        name = requirement_name(req)
        if name in drop or (keep is not None and name not in keep):
            continue
        if req not in selected:
            selected.append(req)
    return selected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default="pyproject.toml", type=Path)
    parser.add_argument("--without", nargs="*", default=[], help="project names to leave out")
    parser.add_argument("--only", nargs="*", default=None, help="keep only these names")
    parser.add_argument("--extra", nargs="*", default=[], help="optional-dependency groups")
    args = parser.parse_args(argv)
    data = tomllib.loads(args.pyproject.read_text())
    for req in select_requirements(
        data,
        without=set(args.without),
        only=set(args.only) if args.only is not None else None,
        extras=args.extra,
    ):
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
