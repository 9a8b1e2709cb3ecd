"""A SIGTERM drain of an API replica with a re-attach grace: streams still open when the
drain ends are cut, but their jobs live on for the grace; each client re-attaches through
the other replica and gets the rest, equal to an uninterrupted run (issue 17, finding 5:
the drain used to cancel them, unlike kill -9)."""

from __future__ import annotations

import signal
import time

import httpx

from tests.support.faults import report
from tests.support.stack import Stack
from tests.support.stream_cut import CutStreams, body, references, tally_line


async def test_sigterm_drain_hands_open_jobs_to_the_other_replica(
    bus_stack: Stack, tiny_llama_long
) -> None:
    model = tiny_llama_long.name
    bus_stack.start_worker("--max-num-seqs", "8", model_dir=tiny_llama_long)
    # Long jobs and a short drain, so the drain surely ends streams mid-way: on a fast CPU
    # the tiny model streams ~3k tokens a second each (3000 tokens against 1 s was not).
    flags = ("--reattach-grace", "10", "--drain-timeout", "0.3")
    api1, api2 = bus_stack.start_api(*flags), bus_stack.start_api(*flags)
    bodies = [body(model, i, 4000) for i in range(3)]
    async with httpx.AsyncClient(timeout=120) as http:
        streams = await CutStreams.open(http, api1.url, bodies)
        api1.signal(signal.SIGTERM)
        cut_at = time.monotonic()
        cut = await streams.ended()
        assert api1.proc.wait(30) == 0
        assert any(cut)  # the drain timeout (0.3 s) ended streams mid-way
        await streams.reattach(api2.url)
        resumed_s = time.monotonic() - cut_at
        refs = await references(api2.url, bodies)
    line, completed, exact = tally_line(streams.joined(), refs)
    report(
        "api_sigterm_drain_reattach",
        f"{line}; {sum(cut)} streams cut by the drain, resumed {resumed_s:.2f}s after SIGTERM",
    )
    assert completed == exact == len(bodies)
