"""Compiled grammars for one model's vocabulary, cached by their canonical spec.

Compiling a JSON schema against a vocabulary takes from a millisecond to seconds for
large schemas, so each distinct constraint is compiled once and kept in an LRU keyed by
`StructuredOutput.cache_key` (kind + canonical text). The vocabulary side (xgrammar's
TokenizerInfo) is built from the model folder's tokenizer.json, the same file the API
tokenizes with, at the model's vocabulary width so a mask row covers every logit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.structured_output import StructuredOutput, build_grammar, grammar_available

DEFAULT_CACHE_SIZE = 256


@dataclass
class CompileStats:
    compiles: int = 0
    hits: int = 0
    compile_seconds: float = 0.0
    last_compile_s: float = 0.0


def tokenizer_info(tokenizer_json: str, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of a `tokenizers` vocabulary (no transformers tokenizer needed)."""
    import xgrammar as xgr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    encoded: list[str] = [""] * vocab_size
    for token, idx in tok.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size:
            encoded[idx] = token
    # Reads the pre-tokenizer/decoder to tell byte-level BPE from SentencePiece-style vocabularies.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
    return xgr.TokenizerInfo(
        encoded,
        vocab_type=meta["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=sorted(stop_token_ids) or None,
        add_prefix_space=meta["add_prefix_space"],
    )


@dataclass
class GrammarCache:
    """Compiler + LRU of compiled grammars; used only from the engine thread."""

    compiler: Any
    vocab_size: int
    capacity: int = DEFAULT_CACHE_SIZE
    stats: CompileStats = field(default_factory=CompileStats)
    _lru: OrderedDict[tuple[str, str], Any] = field(default_factory=OrderedDict)

    @classmethod
    def for_model(
        cls, model_dir: Path, vocab_size: int, stop_token_ids: set[int], capacity: int
    ) -> GrammarCache:
        """ValueError when structured outputs cannot work for this model (say why)."""
        if not grammar_available():
            from shared.structured_output import INSTALL_HINT

            raise ValueError(INSTALL_HINT)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError("structured outputs need the model's tokenizer.json")
        import xgrammar as xgr

        info = tokenizer_info(path.read_text(), vocab_size, sorted(stop_token_ids))
        # One compile thread: the engine has few cores to spare and the cache hides repeats.
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return cls(compiler=compiler, vocab_size=vocab_size, capacity=capacity)

    def get(self, out: StructuredOutput) -> Any:
        key = out.cache_key
        compiled = self._lru.get(key)
        if compiled is not None:
            self._lru.move_to_end(key)
            self.stats.hits += 1
            return compiled
        t0 = time.perf_counter()
        compiled = self.compiler.compile_grammar(build_grammar(out))
        elapsed = time.perf_counter() - t0
        self.stats.compiles += 1
        self.stats.compile_seconds += elapsed
        self.stats.last_compile_s = elapsed
        self._lru[key] = compiled
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._lru)
