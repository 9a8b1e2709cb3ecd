"""The `jetserve` command: each subcommand lives in the module that owns it.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is
imported only when chosen, so `jetserve api` never imports torch. Flags come from the
settings declarations (shared/settings/); a bad flag or env var is one error line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared.settings import SettingsError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-demo": ("engine_worker.demo.checkpoint", "build the small demo model offline"),
    "generate": (
        "engine_worker.engine.generate_cli",
        "generate in-process with the engine, no NATS",
    ),
    "up": ("services.launcher", "run nats-server, the API and a worker together"),
    "api": ("services.api.main", "run the OpenAI-compatible API service"),
    "worker": ("engine_worker.worker.lifecycle", "run an engine worker on one model"),
    "models": ("services.models_cli", "push, list and remove models in the NATS object store"),
    "dead": ("services.dead_letters", "list or replay jobs in the dead-letter stream"),
    "keys": ("services.api.gateway.keys_cli", "create, revoke and list API keys (gateway)"),
    "nats-auth": (
        "services.nats_auth_cli",
        "write the NATS identities' passwords and nats-server's auth (and TLS) includes",
    ),
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = Parser(prog="jetserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, (mod_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(mod_name)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    assert module is not None
    try:
        return int(module.run(args) or 0)
    except SettingsError as e:
        print(f"jetserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
