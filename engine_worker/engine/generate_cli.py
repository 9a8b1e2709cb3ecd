"""`jetserve generate`: one prompt through the in-process engine, for a quick look."""

from __future__ import annotations

import argparse

from shared.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--prompt", action="append", required=True, help="may repeat")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")


def run(args: argparse.Namespace) -> int:
    from engine_worker.engine.llm import LLM

    llm = LLM(args.model)
    prompts = args.prompt
    if args.chat and llm.tokenizer is not None:
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in args.prompt]
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    for prompt, res in zip(args.prompt, llm.generate(prompts, params), strict=True):
        print(f"--- {prompt!r}\n{res.outputs[0].text}  [{res.outputs[0].finish_reason}]")
    return 0
