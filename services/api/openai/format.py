"""Endpoint-neutral generation output -> OpenAI response pieces (usage, logprobs)."""

from __future__ import annotations

from services.api.openai.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)
from services.api.streaming.generation import UsageTotals
from services.api.streaming.token_text import TokenTexts
from shared.messages import TokenLogprobTuple


def usage_info(u: UsageTotals) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def extend_completion_logprobs(
    out: CompletionLogprobs,
    entries: list[TokenLogprobTuple],
    texts: TokenTexts,
    top_k: int,
    text_offset: int,
) -> int:
    """Append tokens to the legacy parallel-list layout; returns the next text offset.

    Offsets count characters of the completion text; a token holding part of a
    multi-byte character adds nothing until the character is complete (approximate).
    """
    for token_id, logprob, top in entries:
        token, raw = texts.get(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append({texts.get(t)[0]: lp for t, lp in top[:top_k]} if top_k else None)
        out.text_offset.append(text_offset)
        text_offset += len(bytes(raw).decode("utf-8", errors="ignore"))
    return text_offset


def chat_logprob_entries(
    entries: list[TokenLogprobTuple], texts: TokenTexts, top_k: int
) -> list[ChatTokenLogprob]:
    out = []
    for token_id, logprob, top in entries:
        token, raw = texts.get(token_id)
        alts = []
        for t, lp in top[:top_k]:
            alt_token, alt_raw = texts.get(t)
            alts.append(TopLogprob(token=alt_token, logprob=lp, bytes=alt_raw))
        out.append(ChatTokenLogprob(token=token, logprob=logprob, bytes=raw, top_logprobs=alts))
    return out


def chat_logprobs(entries: list[ChatTokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=entries, refusal=None)
