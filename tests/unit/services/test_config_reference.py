"""docs/configuration.md is what the settings declarations generate, and every setting in
it has the facts a reader needs."""

from __future__ import annotations

from pathlib import Path

from services.config_reference import commands, env_names, render
from shared.settings import options
from shared.settings.fields import Settings

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "configuration.md"


def test_the_reference_matches_the_code() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: python -m services.config_reference > "
        "docs/configuration.md"
    )


def test_every_setting_has_help_and_every_service_setting_an_env_var() -> None:
    classes: set[type[Settings]] = set()
    for cmd in commands():
        classes |= {o.owner for o in cmd.options()}
    for cls in classes:
        for opt in options(cls):
            assert opt.help, f"{cls.__name__}.{opt.name} has no help"
            assert opt.flag or opt.env or opt.positional, f"{cls.__name__}.{opt.name} cannot be set"
    names = env_names()
    for expected in ("JETSERVE_GPU_MEMORY_UTILIZATION", "JETSERVE_ENABLE_PREFIX_CACHING",
                     "JETSERVE_API_KEYS", "JETSERVE_WORKER_METRICS_PORT"):  # fmt: skip
        assert expected in names
    assert all(n in DOC.read_text() for n in names)
