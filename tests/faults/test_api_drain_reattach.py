"""A SIGTERM drain of an API replica with a re-attach grace: streams still open when the
drain ends are cut, but their jobs live on for the grace; each client re-attaches through
the other replica and gets the rest, equal to an uninterrupted run (issue 17, finding 5:
the drain used to cancel them, unlike kill -9)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.faults.test_api_faults import body, references, tally_line
from tests.support.faults import StreamRead, read_stream, report, wait_for
from tests.support.stack import Stack


async def test_sigterm_drain_hands_open_jobs_to_the_other_replica(
    bus_stack: Stack, tiny_llama_long
) -> None:
    model = tiny_llama_long.name
    bus_stack.start_worker("--max-num-seqs", "8", model_dir=tiny_llama_long)
    flags = ("--reattach-grace", "10", "--drain-timeout", "1")
    api1, api2 = bus_stack.start_api(*flags), bus_stack.start_api(*flags)
    bodies = [body(model, i, 3000) for i in range(3)]
    async with httpx.AsyncClient(timeout=120) as http:
        reads = [StreamRead() for _ in bodies]
        tasks = [
            asyncio.create_task(read_stream(http, "POST", f"{api1.url}/v1/completions", r, b))
            for r, b in zip(reads, bodies, strict=True)
        ]
        await wait_for(lambda: all(len(r.events) >= 5 for r in reads), timeout_s=60)
        api1.signal(signal.SIGTERM)
        cut_at = time.monotonic()
        await asyncio.gather(*tasks)
        assert api1.proc.wait(30) == 0
        cut = [r.broken for r in reads]
        assert any(cut)  # the drain timeout (1 s) ended streams mid-way
        rests = [StreamRead() for _ in reads]
        await asyncio.gather(
            *(
                read_stream(
                    http,
                    "POST",
                    f"{api2.url}/v1/completions",
                    rest,
                    b,
                    headers={"Last-Event-ID": r.last_id},
                )
                for r, rest, b in zip(reads, rests, bodies, strict=True)
                if r.broken  # a stream that finished inside the drain needs nothing
            )
        )
        resumed_s = time.monotonic() - cut_at
        refs = await references(api2.url, bodies)
    joined = [StreamRead(events=r.events + x.events) for r, x in zip(reads, rests, strict=True)]
    line, completed, exact = tally_line(joined, refs)
    report(
        "api_sigterm_drain_reattach",
        f"{line}; {sum(cut)} streams cut by the drain, resumed {resumed_s:.2f}s after SIGTERM",
    )
    assert completed == exact == len(bodies)
