"""Pydantic models of Ollama's HTTP API requests (generate, chat, embed, show, pull, delete).

Parsed strictly from the raw body like the OpenAI routes (a string where a number
belongs is a 400), unknown fields ignored so newer clients keep working. Ollama's
runtime-only options (num_gpu, num_thread, use_mmap, ...) are accepted and have no
effect here; docs/ollama.md lists every field and what jetserve does with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Options(_Request):
    """`options`: the sampling knobs jetserve honours, plus the ones it accepts and ignores."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None
    # Accepted, no effect: llama.cpp runtime and sampler knobs with no engine equivalent.
    num_keep: int | None = None
    repeat_last_n: int | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    vocab_only: bool | None = None


class _Generation(_Request):
    model: str
    stream: bool | None = True
    options: Options | None = None
    format: Any = None  # "json" or a JSON schema: constrained decoding
    keep_alive: float | int | str | None = None  # accepted: workers keep models loaded
    logprobs: bool | None = None
    top_logprobs: int | None = None
    think: bool | str | None = None


class GenerateRequest(_Generation):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    function: ToolCallFunction


class Message(BaseModel):
    """Extra keys are kept: chat templates may render them."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str = "function"
    function: dict[str, Any]


class ChatRequest(_Generation):
    messages: list[Message] | None = None
    tools: list[Tool] | None = None


class EmbedRequest(_Request):
    model: str
    input: str | list[str]
    truncate: bool | None = True
    options: Options | None = None
    keep_alive: float | int | str | None = None
    dimensions: int | None = None
    pooling: Literal["last", "mean"] | None = None  # jetserve extension


class LegacyEmbeddingsRequest(_Request):
    model: str
    prompt: str
    options: Options | None = None
    keep_alive: float | int | str | None = None
    pooling: Literal["last", "mean"] | None = None  # jetserve extension


class ModelRequest(_Request):
    """show, delete: `model` (older clients send `name`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None

    @property
    def model_name(self) -> str | None:
        return self.model or self.name


class PullRequest(ModelRequest):
    insecure: bool | None = None
    stream: bool | None = True
