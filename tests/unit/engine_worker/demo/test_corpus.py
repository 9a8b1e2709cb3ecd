"""The demo builder's inputs, without training: the seeded corpus, the BPE tokenizer it
trains, and document packing. Building and training a checkpoint:
tests/integration/demo/test_checkpoint.py."""

from __future__ import annotations

from engine_worker.demo.checkpoint import (
    pack_documents,
    train_bpe_tokenizer,
)
from engine_worker.demo.corpus import (
    BOS_TOKEN,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    demo_corpus,
)


def test_corpus_is_seeded_and_prefix_stable() -> None:
    a, b = demo_corpus(7, 200), demo_corpus(7, 300)
    assert a == b[:200]
    assert a != demo_corpus(8, 200)
    assert all(doc.startswith(BOS_TOKEN) and doc.endswith(EOS_TOKEN) for doc in a)
    assert any("<|assistant|>" in doc for doc in a) and any("<|user|>" not in doc for doc in a)


def test_tokenizer_keeps_special_tokens_whole_and_round_trips_any_text() -> None:
    tok = train_bpe_tokenizer(demo_corpus(0, 500), 600, SPECIAL_TOKENS, bos_token=BOS_TOKEN)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert not any("<|" in t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)
    ids = tok.encode("<|user|>Hi<|end|>", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id("<|end|>")
    text = "Olá! 東京 🚀 tabs\tand  spaces"
    enc = tok.encode(text)
    assert enc.ids[0] == tok.token_to_id(BOS_TOKEN)
    assert tok.decode(enc.ids, skip_special_tokens=True) == text


def test_pack_documents_starts_rows_at_documents() -> None:
    rows = pack_documents([[0, 5, 6], [0, 7], [0, 8, 9, 10, 11, 12]], row_len=5, pad_id=1)
    assert rows == [[0, 5, 6, 0, 7], [0, 8, 9, 10, 11]]
    assert pack_documents([[0, 5], [0, 6]], row_len=5, pad_id=1) == [[0, 5, 0, 6, 1]]


def test_copy_conversations_repeat_their_passage() -> None:
    """The speculative decoding benchmark's models learn these: the answer is the
    passage, or the passage with the one word replaced."""
    import random
    import re

    from engine_worker.demo.corpus import copy_conversation

    r = random.Random(5)
    for _ in range(50):
        user, assistant = copy_conversation(r)
        prompt, answer = user["content"], assistant["content"]
        if prompt.startswith("Repeat this passage: "):
            assert answer == prompt.removeprefix("Repeat this passage: ")
        else:
            old, new, passage = re.fullmatch(
                r"Replace (\w+) with (\w+) in this passage: (.*)", prompt
            ).groups()
            assert answer == re.sub(rf"\b{old}\b", new, passage)


def test_copy_fraction_zero_is_the_demo_corpus() -> None:
    from engine_worker.demo.corpus import demo_corpus

    assert demo_corpus(3, 40, copy_fraction=0.0) == demo_corpus(3, 40)
    mixed = demo_corpus(3, 40, copy_fraction=0.5)
    assert sum("this passage:" in d for d in mixed) > 5
