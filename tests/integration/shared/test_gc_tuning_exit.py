"""A service that tuned its collector exits without third-party leak reports: objects
left frozen are never finalized, and Triton's nanobind bindings then print 'leaked
instances' to stderr at exit (seen in `jetserve up`'s output)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.stack import REPO_ROOT

pytestmark = pytest.mark.integration


def test_exit_after_tune_gc_prints_nothing() -> None:
    pytest.importorskip("triton")
    code = "import triton\nfrom shared.gc_tuning import tune_gc\ntune_gc()\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout == "", out.stderr[:500]
