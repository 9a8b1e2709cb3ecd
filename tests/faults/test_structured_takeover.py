"""kill -9 of a worker mid-way through schema-constrained jobs: the survivor replays the
stored tokens through a fresh grammar matcher and continues under the same constraint,
so each job's tokens equal an uninterrupted run and its text validates."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import jsonschema
import pytest

from shared.structured_output import json_schema_output
from shared.tokenizer import load_tokenizer
from tests.support.faults import report, submit_watched, tally_of, worker_of
from tests.support.polling import wait_for
from tests.support.stack import BusClient, Stack

pytest.importorskip("xgrammar")

ACK_WAIT = "2.5"
# Long on purpose (60 numbers, ~200 tokens) so the kill lands mid-object.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "maxLength": 6},
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 60,
            "maxItems": 60,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["id", "values", "ok"],
    "additionalProperties": False,
}


async def test_constrained_jobs_survive_a_worker_kill(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path
) -> None:
    flags = ("--max-num-seqs", "8", "--ack-wait", ACK_WAIT)
    workers = [bus_stack.start_worker(*flags) for _ in range(2)]
    constraint = json_schema_output(SCHEMA)
    jobs = [
        bus.make_job(
            [1, 20 + i, 31, 42],
            max_tokens=400,
            temperature=0.9,
            seed=300 + i,
            n=2 if i == 0 else 1,
            structured=constraint,
        )
        for i in range(6)
    ]
    expected, collectors = await submit_watched(bus, tiny_llama, jobs, timeout_s=180)

    first = collectors[0]
    await wait_for(lambda: first.num_tokens >= 30, timeout_s=60)
    holder = first.deltas[-1].worker_id
    doomed = worker_of(workers, holder)
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    await asyncio.gather(*(c.wait() for c in collectors))

    tally = tally_of(collectors, expected)
    interrupted = [
        c
        for c in collectors
        if c.deltas[0].worker_id == holder and c.deltas[-1].worker_id != holder
    ]
    report("structured_kill9", f"{tally.line()}; {len(interrupted)} constrained jobs taken over")
    tally.assert_exact()
    assert interrupted, "the kill came too late: no constrained job was interrupted"
    tok = load_tokenizer(tiny_llama)
    for c in collectors:
        for index, tokens in c.tokens().items():
            assert tokens[-1] in tok.eos_token_ids, (c.job.id, index)  # the grammar ended it
            jsonschema.validate(json.loads(tok.decode(tokens)), SCHEMA)
