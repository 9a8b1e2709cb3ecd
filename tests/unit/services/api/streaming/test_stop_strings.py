"""Stop strings on detokenized text: split across pieces, earliest match wins."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.streaming.stop_strings import StopStringMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stops)
    out = []
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_stop_string_split_over_pieces_is_held_back_then_cut():
    m = StopStringMatcher(["</end>"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.held == "</"
    assert m.feed("en") == ("", False)
    assert m.feed("d> tail") == ("", True)
    assert m.matched == "</end>"
    assert m.flush() == ""


def test_partial_match_that_diverges_is_released():
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("AY") == ("STAY", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_the_stop_string_that_completes_first_wins():
    assert run(["world", "lo w"], ["hello world"]) == ("hel", True)
    # "bc" is complete before "abcd" is, however the text is split
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert run(["abcd", "bc"], ["ab", "cd"]) == ("a", True)


def test_no_stop_strings_passes_text_through():
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_feed_after_stop_emits_nothing():
    m = StopStringMatcher(["x"])
    assert m.feed("abxcd") == ("ab", True)
    assert m.feed("more") == ("", True)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_streaming_equals_one_shot_truncation(text, stops, cuts):
    """However the text is split, output ends where the first-completed stop string starts."""
    bounds = [0, *sorted(c for c in set(cuts) if c < len(text)), len(text)]
    pieces = [text[a:b] for a, b in pairwise(bounds)]
    hits = [(p + len(s), p) for s, p in ((s, text.find(s)) for s in stops) if p != -1]
    expected = (text[: min(hits)[1]], True) if hits else (text, False)
    assert run(stops, pieces) == expected
