"""`jetserve` flags come from the settings declarations: --help shows each default and env
var, options work in any position, bad input is one error line with exit code 2."""

from __future__ import annotations

import pytest

from services.cli import SUBCOMMANDS, build_parser, main
from services.config_reference import commands


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_help_shows_every_default_and_env_var(command: str) -> None:
    cmds = [c for c in commands() if c.name.split()[0] == command]
    assert cmds and any(c.options() for c in cmds)
    for cmd in cmds:
        # Unwrap argparse's lines (it also breaks after hyphens).
        text = " ".join(cmd.parser.format_help().split()).replace("- ", "-")
        for opt in cmd.options():
            assert (opt.flag or opt.metavar) in text, (cmd.name, opt.name)
            wanted = (
                "required" if opt.shown_default == "required" else f"default: {opt.shown_default}"
            )
            assert wanted in text, (cmd.name, opt.name)
            if opt.env:
                assert f"env {opt.env}" in text, (cmd.name, opt.name)


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "list", "--json"],
        ["keys", "--json", "list"],
        ["keys", "list", "--json", "--nats-url", "nats://h:1"],
        ["keys", "--nats-url", "nats://h:1", "list", "--json"],
    ],
)
def test_options_work_before_and_after_the_action(argv: list[str]) -> None:
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    assert (args.action, args.as_json) == ("list", True)
    from shared.settings import BusSettings

    expected = "nats://h:1" if "--nats-url" in argv else BusSettings().nats_url
    assert BusSettings.from_args(args, {}).nats_url == expected


def test_dead_list_takes_bus_flags_in_any_position() -> None:
    for argv in (
        ["dead", "list", "--json", "--ack-wait", "9"],
        ["dead", "--ack-wait", "9", "list"],
    ):
        parser, _ = build_parser(argv)
        assert parser.parse_args(argv).ack_wait_s == 9.0


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_bad_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["worker", "--model", "m", "--max-num-seqs", "0"])
    assert e.value.code == 2
    err = one_error_line(capsys)
    assert err.startswith("jetserve worker: error: argument --max-num-seqs: input should be")
    assert "got '0'" in err


@pytest.mark.parametrize(
    "argv,env,fragment",
    [
        (["worker", "--model", "m"], {"JETSERVE_LOG_JSON": "maybe"}, "JETSERVE_LOG_JSON: expected"),
        (
            ["worker", "--model", "m"],
            {"JETSERVE_KV_CACHE_MEMORY": "-1"},
            "JETSERVE_KV_CACHE_MEMORY",
        ),
        (["api"], {"JETSERVE_AUTH": "maybe"}, "jetserve api: error: JETSERVE_AUTH: expected"),
        (["api"], {"JETSERVE_MAX_BODY_BYTES": "0"}, "JETSERVE_MAX_BODY_BYTES: input should be"),
        (["worker"], {}, "a worker needs a model folder: --model PATH or JETSERVE_MODEL"),
        (["worker", "--model", "m", "--ack-wait", "1"], {}, "--ack-wait / JETSERVE_ACK_WAIT must"),
        (["dead", "replay"], {}, "give --id ID (repeatable) or --all"),
        (["generate", "--model", "/nonexistent", "--prompt", "x"], {}, "does not exist"),
    ],
)
def test_a_bad_env_var_or_combination_is_one_line(
    argv: list[str],
    env: dict[str, str],
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"jetserve {argv[0]}: error: ") and fragment in err, err


def test_up_hands_the_engine_flags_it_was_given_to_its_worker() -> None:
    from shared.settings import EngineSettings, LauncherSettings, WorkerSettings
    from shared.settings.fields import to_argv

    argv = ["up", "--block-size", "8", "--no-enable-prefix-caching", "--kv-cache-memory", "1GiB"]
    parser, _ = build_parser(argv)
    launcher = LauncherSettings.from_args(parser.parse_args(argv), {})
    handed = to_argv(launcher, [EngineSettings])
    assert handed == ["--block-size", "8", "--kv-cache-memory", "1073741824",
                      "--no-enable-prefix-caching"]  # fmt: skip
    worker_argv = ["worker", "--model", "m", *handed]
    parser, _ = build_parser(worker_argv)
    worker = WorkerSettings.from_args(parser.parse_args(worker_argv), {})
    assert (worker.block_size, worker.kv_cache_memory, worker.enable_prefix_caching) == (
        8,
        1024**3,
        False,
    )
