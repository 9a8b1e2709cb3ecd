"""docs/openai.md's field tables cover every request field and are the generated ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.api.openai.field_support import ENDPOINTS, embedded, markdown, request_fields

DOC = Path(__file__).resolve().parents[5] / "docs" / "openai.md"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
def test_every_request_field_has_exactly_one_row(endpoint) -> None:
    assert set(endpoint.fields) == set(request_fields(endpoint.model))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
def test_rejected_rows_carry_a_value_that_gets_the_400(endpoint) -> None:
    for name, support in endpoint.fields.items():
        assert support.note, name
        if support.status == "rejected":
            assert support.example is not None, f"{name}: rejected without an example"


def test_the_page_holds_the_generated_tables() -> None:
    assert embedded(DOC.read_text()) == markdown(), (
        "docs/openai.md is stale: python -m services.api.openai.field_support --write "
        "docs/openai.md"
    )
