"""Qwen3-style reasoning: `<think>...</think>` split off the answer into reasoning_content.

Incremental, so streaming and non-streaming split the same text the same way: text that
could still turn out to be the start of a tag is held back until it is decided. A model
whose prompt already opens the think block (templates that end the generation prompt
with `<think>`) starts in reasoning and only emits the closing tag.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


def held_back(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ReasoningSplitter:
    """feed(text) -> (reasoning, content) pieces that are final."""

    mode: str = "undecided"  # "undecided" | "reasoning" | "content"
    buf: str = ""
    strip_leading: bool = False  # drop the blank line a model puts after </think>

    @classmethod
    def for_prompt(cls, prompt_text: str) -> ReasoningSplitter:
        opened = prompt_text.rstrip().endswith(THINK_START)
        return cls(mode="reasoning" if opened else "undecided")

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.mode == "undecided":
            head = self.buf.lstrip()
            if head.startswith(THINK_START):
                self.mode, self.buf = "reasoning", head[len(THINK_START) :]
            elif not head or THINK_START.startswith(head):
                return "", ""
            else:
                self.mode = "content"
        if self.mode == "reasoning":
            end = self.buf.find(THINK_END)
            if end < 0:
                keep = held_back(self.buf, THINK_END)
                reasoning, self.buf = (
                    self.buf[: len(self.buf) - keep],
                    self.buf[len(self.buf) - keep :],
                )
                return reasoning, ""
            reasoning, self.buf = self.buf[:end], self.buf[end + len(THINK_END) :]
            self.mode, self.strip_leading = "content", True
        if self.strip_leading:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return reasoning, ""
            self.strip_leading = False
        content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held back: an unclosed think block stays reasoning (cut by max_tokens)."""
        rest, self.buf = self.buf, ""
        if self.mode == "reasoning":
            return rest, ""
        return "", rest.lstrip() if self.strip_leading else rest
