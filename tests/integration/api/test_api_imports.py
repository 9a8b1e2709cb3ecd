"""The API image has no torch: importing and building the app must not pull it in."""

from __future__ import annotations

import subprocess
import sys


def test_api_service_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from services.cli import build_parser\n"
        "build_parser(['api'])\n"
        "from services.api.app import create_app\n"
        "from shared.settings import ApiSettings\n"
        "create_app(ApiSettings())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine_worker'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
