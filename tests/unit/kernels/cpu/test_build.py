"""The CPU kernels' build digest names every byte they compile from: the sources and the
headers they include, so editing a header makes a new library instead of loading a stale
one from the cache."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from jetserve_kernels.cpu import build


def test_every_included_local_header_is_digested() -> None:
    included = {
        name
        for source in build.SOURCES + build.HEADERS
        for name in re.findall(r'#include "([^"]+)"', source.read_text())
    }
    assert included, "the kernels include their shared headers"
    assert included <= {h.name for h in build.HEADERS}


def test_a_header_edit_changes_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    for header in build.HEADERS:
        copies.append(tmp_path / header.name)
        shutil.copy(header, copies[-1])
    monkeypatch.setattr(build, "HEADERS", copies)
    before = build.extension_name()
    assert build.extension_name() == before  # stable while nothing changes
    copies[0].write_text(copies[0].read_text() + "\n// edited\n")
    assert build.extension_name() != before
