"""The dashboard stand-in renderer fills Grafana's variables and legends the way Grafana
does, so the picture in docs/deploy.md plots the dashboard's own queries."""

from __future__ import annotations

from tests.support.deploy_files import DEPLOY, dashboard_exprs, load_script

_render = load_script(DEPLOY / "grafana" / "render_dashboard.py")
fill_variables, format_value, legend = _render.fill_variables, _render.format_value, _render.legend


def test_every_dashboard_query_is_fully_expanded() -> None:
    for _, expr in dashboard_exprs():
        filled = fill_variables(expr, "1m", {"model": ".*"})
        assert "$" not in filled
        assert ("[1m]" in filled) == ("$__rate_interval" in expr)


def test_legend_format_uses_series_labels() -> None:
    labels = {"model_name": "demo", "instance": "10.0.0.1:8001", "finished_reason": "stop"}
    assert legend("p90 {{model_name}}", labels) == "p90 demo"
    assert legend("{{ finished_reason }} {{model_name}}", labels) == "stop demo"
    assert legend("{{model_name}} {{missing}}", labels) == "demo"
    assert legend("", {"job": "x"}) == '{"job": "x"}'


def test_values_are_shown_in_the_panel_unit() -> None:
    assert format_value(0.253, "percentunit") == "25.3%"
    assert format_value(0.15, "s") == "150 ms"
    assert format_value(2.5, "s") == "2.50 s"
    assert format_value(3.0, "none") == "3"
    assert format_value(201.25, "short") == "201.2"
