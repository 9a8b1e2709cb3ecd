"""Every setting of every jetserve process, each declared once (see fields.py for how).

One class per concern: logging and NATS (bus), the API and its gateway, the engine, the
worker, the launcher. Commands build their flags from these classes, env vars are read
from them, and docs/configuration.md is generated from them.
"""

from shared.settings.api import ApiSettings
from shared.settings.bus import DEFAULT_NATS_URL, BusSettings, LogSettings
from shared.settings.engine import CPU_KV_CACHE_MEMORY, EngineSettings
from shared.settings.fields import (
    ENV_PREFIX,
    Settings,
    SettingsError,
    add_flags,
    options,
    parse_bool,
    setting,
)
from shared.settings.gateway import GatewaySettings
from shared.settings.launcher import DEFAULT_DATA_DIR, LauncherSettings
from shared.settings.worker import DEFAULT_METRICS_PORT, WorkerSettings

__all__ = [
    "CPU_KV_CACHE_MEMORY",
    "DEFAULT_DATA_DIR",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_NATS_URL",
    "ENV_PREFIX",
    "ApiSettings",
    "BusSettings",
    "EngineSettings",
    "GatewaySettings",
    "LauncherSettings",
    "LogSettings",
    "Settings",
    "SettingsError",
    "WorkerSettings",
    "add_flags",
    "options",
    "parse_bool",
    "setting",
]
