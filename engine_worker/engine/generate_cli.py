"""`jetserve generate`: one prompt through the in-process engine, for a quick look."""

from __future__ import annotations

import argparse
from typing import ClassVar

from shared.sampling_params import SamplingParams
from shared.settings import (
    EngineSettings,
    Settings,
    SettingsError,
    WorkerSettings,
    add_flags,
    setting,
)
from shared.settings.fields import same_as


class GenerateOptions(Settings):
    section: ClassVar[str] = "generate"

    model: str = same_as(
        WorkerSettings,
        "model",
        default=...,
        help="Hugging Face model folder",
        shown_default="required",
    )
    prompt: list[str] = setting(env=None, help="prompt text (repeatable)")
    max_tokens: int = setting(64, ge=1, env=None, help="tokens to generate per prompt")
    temperature: float = setting(0.0, ge=0, env=None, help="sampling temperature; 0 is greedy")
    chat: bool = setting(False, env=None, help="wrap each prompt in the model's chat template")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, GenerateOptions, EngineSettings)


def run(args: argparse.Namespace) -> int:
    from engine_worker.engine.llm import LLM

    opts = GenerateOptions.from_args(args)
    engine = EngineSettings.from_args(args)
    try:
        llm = LLM(opts.model, **engine.model_dump())
    except ValueError as e:  # a model folder or a size that does not fit: one line
        raise SettingsError(str(e)) from None
    prompts = opts.prompt
    if opts.chat and llm.tokenizer is not None:
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=opts.max_tokens, temperature=opts.temperature)
    for prompt, res in zip(opts.prompt, llm.generate(prompts, params), strict=True):
        print(f"--- {prompt!r}\n{res.outputs[0].text}  [{res.outputs[0].finish_reason}]")
    return 0
