"""The settings mechanism: precedence, the one bool parser, bounds, bad values, flags."""

from __future__ import annotations

import argparse
from typing import ClassVar, Literal

import pytest
from pydantic import ByteSize

from shared.settings import (
    ApiSettings,
    EngineSettings,
    GatewaySettings,
    Settings,
    SettingsError,
    WorkerSettings,
    add_flags,
    options,
    parse_bool,
    setting,
)
from shared.settings.fields import to_argv


class Demo(Settings):
    section: ClassVar[str] = "demo"

    size: ByteSize = setting(ByteSize(1024), ge=1, help="a size")
    count: int = setting(3, ge=1, le=10, help="a count")
    wait_s: float = setting(1.5, gt=0, help="a wait")
    on: bool = setting(True, help="a switch")
    mode: Literal["fast", "slow"] = setting("fast", help="a choice")
    names: tuple[str, ...] = setting((), help="a list")
    secret: str | None = setting(None, flag=None, help="env only")
    label: str = setting("x", env="OTHER_LABEL", flag="--tag", help="renamed")


def parse(cls: type[Settings], argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return cls.from_args(parser.parse_args(argv), environ)


def test_names_are_derived_from_the_field_unless_given() -> None:
    by_name = {o.name: o for o in options(Demo)}
    assert (by_name["wait_s"].flag, by_name["wait_s"].env) == ("--wait", "JETSERVE_WAIT")
    assert (by_name["label"].flag, by_name["label"].env) == ("--tag", "JETSERVE_OTHER_LABEL")
    assert (by_name["secret"].flag, by_name["secret"].env) == (None, "JETSERVE_SECRET")


def test_flag_beats_env_beats_default() -> None:
    env = {"JETSERVE_COUNT": "5", "JETSERVE_WAIT": "2", "JETSERVE_OTHER_LABEL": "env"}
    s = parse(Demo, ["--count", "7"], env)
    assert (s.count, s.wait_s, s.label, s.mode) == (7, 2.0, "env", "fast")
    assert s.is_set("count") and s.is_set("wait_s") and not s.is_set("mode")
    assert parse(Demo, [], {}).count == 3


def test_an_empty_env_var_counts_as_unset() -> None:
    assert parse(Demo, [], {"JETSERVE_COUNT": ""}).count == 3


@pytest.mark.parametrize(
    "raw,value",
    [
        *[("1", True), ("true", True), ("YES", True), (" on ", True)],
        *[("0", False), ("False", False), ("no", False), ("off", False)],
    ],
)
def test_one_bool_parser(raw: str, value: bool) -> None:
    assert parse_bool(raw) is value
    assert parse(Demo, [], {"JETSERVE_ON": raw}).on is value


@pytest.mark.parametrize("raw", ["maybe", "2", "", "tru", "none"])
def test_a_bad_bool_is_an_error_never_false(raw: str) -> None:
    with pytest.raises(ValueError, match="expected 1/true/yes/on or 0/false/no/off"):
        parse_bool(raw)
    if raw.strip():
        with pytest.raises(SettingsError, match=f"JETSERVE_ON: .*got {raw!r}"):
            Demo.from_env({"JETSERVE_ON": raw})


def test_bool_flags_are_on_and_off_switches() -> None:
    assert parse(Demo, ["--no-on"], {"JETSERVE_ON": "1"}).on is False
    assert parse(Demo, ["--on"], {"JETSERVE_ON": "0"}).on is True


@pytest.mark.parametrize(
    "env,message",
    [
        ({"JETSERVE_COUNT": "0"}, "JETSERVE_COUNT: input should be greater than or equal to 1"),
        ({"JETSERVE_COUNT": "11"}, "JETSERVE_COUNT: input should be less than or equal to 10"),
        ({"JETSERVE_COUNT": "many"}, "JETSERVE_COUNT: input should be a valid integer"),
        ({"JETSERVE_COUNT": "2.5"}, "JETSERVE_COUNT: input should be a valid integer"),
        ({"JETSERVE_WAIT": "-1"}, "JETSERVE_WAIT: input should be greater than 0"),
        ({"JETSERVE_SIZE": "-5"}, "JETSERVE_SIZE: could not parse value and unit"),
        ({"JETSERVE_MODE": "medium"}, "JETSERVE_MODE: input should be 'fast' or 'slow'"),
    ],
)
def test_bad_env_values_are_one_line_naming_the_variable(env: dict, message: str) -> None:
    with pytest.raises(SettingsError) as e:
        Demo.from_env(env)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value) and repr(next(iter(env.values()))) in str(e.value)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--count", "0"], "argument --count: input should be greater than or equal to 1"),
        (["--wait", "soon"], "argument --wait: input should be a valid number"),
        (["--size", "-1"], "argument --size: could not parse value and unit"),
        (["--mode", "medium"], "argument --mode: input should be 'fast' or 'slow'"),
    ],
)
def test_bad_flags_name_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(Demo, argv, {})
    assert message in capsys.readouterr().err


def test_values_are_parsed_not_coerced() -> None:
    s = parse(Demo, ["--size", "2MiB", "--mode", "SLOW"], {"JETSERVE_NAMES": "a, b,,c"})
    assert (s.size, s.mode, s.names) == (2 * 1024 * 1024, "slow", ("a", "b", "c"))


def test_settings_are_frozen_and_reject_unknown_names() -> None:
    s = Demo()
    with pytest.raises(ValueError):
        s.count = 4  # type: ignore[misc]
    with pytest.raises(ValueError):
        Demo(unknown=1)  # type: ignore[call-arg]


def test_to_argv_reproduces_what_was_set() -> None:
    s = parse(Demo, ["--no-on", "--count", "4", "--tag", "t"], {})
    assert to_argv(s, [Demo]) == ["--count", "4", "--no-on", "--tag", "t"]
    assert parse(Demo, to_argv(s, [Demo]), {}) == s


def test_the_services_defaults_are_declared_once() -> None:
    """The engine's defaults are the worker's and the launcher's: one declaration."""
    from engine_worker.engine.config import EngineConfig
    from shared.settings import LauncherSettings

    config = EngineConfig(model="m")
    for name in EngineSettings.model_fields:
        assert getattr(config, name) == getattr(WorkerSettings(), name), name
        assert getattr(LauncherSettings(), name) == getattr(config, name), name
    assert config.kv_cache_memory is None and config.max_num_seqs == 64
    assert ApiSettings().port == LauncherSettings().port == 8000


def test_cross_field_rules_name_the_flags() -> None:
    with pytest.raises(SettingsError, match=r"--heartbeat-interval .* must be below --worker-ttl"):
        WorkerSettings(model="m", heartbeat_interval_s=20).validate()
    with pytest.raises(SettingsError, match="--block-size / JETSERVE_BLOCK_SIZE: must be a power"):
        WorkerSettings.from_env({"JETSERVE_BLOCK_SIZE": "24"})
    with pytest.raises(SettingsError, match="--device / JETSERVE_DEVICE"):
        WorkerSettings.from_env({"JETSERVE_DEVICE": "tpu"})


def test_gateway_lists_and_env_only_secrets() -> None:
    g = GatewaySettings.from_env(
        {"JETSERVE_CORS_ORIGINS": "http://a,http://b", "JETSERVE_FALLBACK_API_KEY": "sk-1"}
    )
    assert g.cors_origins == ("http://a", "http://b") and g.fallback_api_key == "sk-1"
    parser = argparse.ArgumentParser()
    add_flags(parser, GatewaySettings)
    assert "--fallback-api-key" not in parser.format_help()
    with pytest.raises(SettingsError, match="JETSERVE_AUTH: expected"):
        GatewaySettings.from_env({"JETSERVE_AUTH": "maybe"})
