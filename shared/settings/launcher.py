"""`jetserve up`: nats-server, one worker and the API on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from shared.settings.api import ApiSettings
from shared.settings.bus import LogSettings
from shared.settings.engine import EngineSettings
from shared.settings.fields import same_as, setting
from shared.settings.worker import WorkerSettings

DEFAULT_DATA_DIR = ".jetserve"


class LauncherSettings(LogSettings, EngineSettings):
    """Engine flags given to `up` are handed on to its worker."""

    section: ClassVar[str] = "launcher"

    model: str = same_as(
        WorkerSettings,
        "model",
        help="Hugging Face model folder; empty: build and serve the demo model",
        shown_default="empty",
    )
    model_name: str = same_as(WorkerSettings, "model_name")
    host: str = setting(
        "127.0.0.1",
        env="API_HOST",
        help="bind address of the API; API keys are off in `up`, so only this machine by default",
    )
    port: int = same_as(ApiSettings, "port")
    nats_port: int = setting(4222, ge=1, le=65535, help="port of the embedded nats-server")
    metrics_port: int = same_as(
        WorkerSettings,
        "metrics_port",
        help="port of the worker's /metrics and /health (checked free before start)",
    )
    data_dir: str = setting(DEFAULT_DATA_DIR, help="JetStream store and the demo model live here")
    demo_model_dir: str = setting(
        "",
        help="where the demo model is built; empty: <data-dir>/models/jetserve-demo",
    )

    @property
    def resolved_demo_model_dir(self) -> Path:
        return Path(self.demo_model_dir or Path(self.data_dir) / "models" / "jetserve-demo")
