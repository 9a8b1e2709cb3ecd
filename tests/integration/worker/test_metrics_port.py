"""Two workers on one host share the queue (README): the second finds the default
/metrics port taken and takes a free one, saying which; a port someone chose and cannot
have is a clear error, not a silent move."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from shared.settings import DEFAULT_METRICS_PORT
from tests.support.stack import BusClient, Stack


@contextlib.contextmanager
def default_port_taken():
    """Make sure the default metrics port is busy (held here unless something else has it)."""
    sock = socket.socket()
    try:
        with contextlib.suppress(OSError):
            sock.bind(("0.0.0.0", DEFAULT_METRICS_PORT))
            sock.listen()
        yield
    finally:
        sock.close()


def spawn_worker(stack: Stack, *flags: str):
    """`jetserve worker` with no --metrics-port (and no env var for it) unless in flags."""
    name = f"worker{len(stack.workers)}"
    args = ["worker", "--model", str(stack.model_dir), "--nats-url", stack.nats_url,
            "--metrics-host", "127.0.0.1", "--worker-id", name, *flags]  # fmt: skip
    return stack._spawn(name, args, 0, {"JETSERVE_WORKER_METRICS_PORT": ""})


async def test_two_workers_on_one_host_both_serve(bus_stack: Stack, bus: BusClient) -> None:
    with default_port_taken():
        first, second = spawn_worker(bus_stack), spawn_worker(bus_stack)
        deadline = time.monotonic() + 120
        while len(await bus.workers()) < 2 and time.monotonic() < deadline:
            assert first.alive and second.alive, first.log()[-2000:] + second.log()[-2000:]
            await asyncio.sleep(0.2)
        statuses = {s.worker_id: s for s in await bus.workers()}
        assert set(statuses) == {"worker0", "worker1"}
        ports = {statuses[w].metrics_port for w in statuses}
        assert len(ports) == 2 and DEFAULT_METRICS_PORT not in ports
        for svc in (first, second):
            svc.port = statuses[svc.name].metrics_port
            svc.wait_http("/health")
            (busy,) = [e for e in svc.log_events() if e.get("event") == "metrics_port_busy"]
            assert (busy["wanted"], busy["port"]) == (DEFAULT_METRICS_PORT, svc.port)

        taken = first.port
        third = spawn_worker(bus_stack, "--metrics-port", str(taken))
        assert third.proc.wait(120) == 1
        (failed,) = [e for e in third.log_events() if e.get("event") == "worker_start_failed"]
        assert (
            f"--metrics-port / JETSERVE_WORKER_METRICS_PORT {taken} cannot be bound"
            in (failed["error"])
        )
