"""Build the engine a config asks for: the real one, or the simulated device."""

from __future__ import annotations

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine


def build_engine(config: EngineConfig) -> LLMEngine:
    if config.load_format == "simulated":
        from engine_worker.engine.simulated.engine import SimulatedEngine

        return SimulatedEngine(config)
    return LLMEngine(config)
