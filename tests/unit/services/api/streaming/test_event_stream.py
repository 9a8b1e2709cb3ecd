"""How both endpoints consume a Generation: collected (finish reason per choice, a failed
job a 500) and streamed (a failed job an error event, then [DONE])."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from services.api.errors import APIError
from services.api.jobs.client import JobFailed
from services.api.streaming.event_stream import collect_events, sse_body
from services.api.streaming.generation import ChoiceEvent


def event(index: int, text: str, finish: str | None = None) -> ChoiceEvent:
    return ChoiceEvent(index, text, [], None, finish, f"job{index}:{len(text)}")


@dataclass
class RecordedGeneration:
    """The part of a Generation the consumers read: its choices and event batches,
    then optionally the JobFailed a broken job raises."""

    choices: list[int]
    batches: list[list[ChoiceEvent]]
    fails: bool = False

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        for batch in self.batches:
            yield batch
        if self.fails:
            raise JobFailed("worker reported an error")


async def test_collect_takes_every_event_in_order_and_each_choices_finish_reason() -> None:
    gen = RecordedGeneration(
        [0, 1, 2],
        [[event(0, "a"), event(1, "b")], [event(1, "c", "length")], [event(0, "d", "stop")]],
    )
    taken: list[tuple[int, str]] = []
    finish = await collect_events(gen, lambda ev: taken.append((ev.index, ev.text)))
    assert taken == [(0, "a"), (1, "b"), (1, "c"), (0, "d")]
    assert finish == {0: "stop", 1: "length", 2: None}


async def test_collect_turns_a_failed_job_into_a_500() -> None:
    gen = RecordedGeneration([0], [[event(0, "a")]], fails=True)
    with pytest.raises(APIError) as err:
        await collect_events(gen, lambda ev: None)
    assert err.value.status == 500 and err.value.code == "internal_error"
    assert "worker reported an error" in err.value.message


async def test_stream_ends_a_failed_job_with_an_error_event_then_done() -> None:
    gen = RecordedGeneration([0], [[event(0, "a"), event(0, "b")]], fails=True)
    body = b"".join([chunk async for chunk in sse_body(gen, lambda ev: json.dumps(ev.text))])
    datas = [ln[6:] for ln in body.decode().splitlines() if ln.startswith("data: ")]
    assert datas[:2] == ['"a"', '"b"']
    assert json.loads(datas[2])["error"]["code"] == "internal_error"
    assert datas[3] == "[DONE]"
