"""Offline generation in-process, like vLLM's LLM.generate: no NATS, no HTTP."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.factory import build_engine
from engine_worker.engine.outputs import TokenLogprob
from shared.sampling_params import SamplingParams
from shared.tokenizer import TokenizerBundle, load_tokenizer


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.engine = build_engine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer: TokenizerBundle | None = None
        try:
            self.tokenizer = load_tokenizer(model)
        except ValueError:
            self.tokenizer = None  # token-id prompts still work
        if self.tokenizer is not None:
            self.engine.eos_token_ids |= self.tokenizer.eos_token_ids
        self._ids = itertools.count()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer.json; pass token ids")
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Submit all prompts at once and run the engine until every one finishes."""
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, GenerationResult] = {}
        order: list[str] = []
        for prompt, p in zip(prompts, plist, strict=True):
            rid = f"offline-{next(self._ids)}"
            ids = self.encode(prompt)
            self.engine.add_request(rid, ids, p)
            results[rid] = GenerationResult(rid, ids, [Completion(i) for i in range(p.n)])
            order.append(rid)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.num_cached_tokens = out.num_cached_tokens
                for d in out.deltas:
                    comp = res.outputs[d.index]
                    comp.token_ids.extend(d.token_ids)
                    if d.logprobs is not None:
                        comp.logprobs = (comp.logprobs or []) + d.logprobs
                    if d.finish_reason:
                        comp.finish_reason = d.finish_reason
        if self.tokenizer is not None:
            for res in results.values():
                for comp in res.outputs:
                    comp.text = self.tokenizer.decode(comp.token_ids)
        return [results[rid] for rid in order]
