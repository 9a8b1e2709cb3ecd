"""structlog setup shared by both services: JSON lines for machines, console lines for people.

A person at a terminal reads console lines; a log collector reads one JSON object per
line. `json=None` picks by whether stderr is a terminal (`--log-json` / `--no-log-json`
force either).

Services bind the job id with `structlog.contextvars.bind_contextvars(job_id=...)` inside
the task that handles the job; `merge_contextvars` then stamps it on every line that
task logs, including lines from library code routed through stdlib logging.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}; got {level!r}") from None


def _drop_color_message(_logger: object, _name: str, event: dict) -> dict:
    """uvicorn passes an ANSI-coloured copy of each message as an extra; one copy is enough."""
    event.pop("color_message", None)
    return event


def wants_json(json: bool | None) -> bool:
    """JSON unless asked otherwise or stderr is a terminal."""
    return not sys.stderr.isatty() if json is None else json


def configure_logging(level: str | int = "info", json: bool | None = None) -> None:
    """Route structlog and stdlib logging (uvicorn, nats) through one renderer on stderr."""
    lvl = parse_level(level)
    json = wants_json(json)
    stamp = (
        structlog.processors.TimeStamper(fmt="iso", utc=True)
        if json
        else structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        stamp,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
