"""Test harness: a real nats-server, workers and API replicas as real subprocesses.

`Stack` starts services on free ports with their logs in files, waits until they report
healthy, reads their /metrics, and stops or kills them. `BusClient` plays the API's side
of the bus (publish Jobs, read Deltas from LLM_EVENTS, cancel, read the registry) so the
worker can be tested without the API. The fixtures built on them (`bus_stack`, `stack`,
`bus`) are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js.api import ConsumerInfo, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from shared.bus.jetstream import ensure_streams, workers_bucket
from shared.bus.subjects import (
    JOBS_STREAM,
    cancel_subject,
    consumer_name,
    events_subject,
    jobs_subject,
)
from shared.bus.worker_registry import WorkerStatus, live_workers
from shared.messages import Delta, Job, SamplingParams, decode_delta, encode_job
from shared.settings import BusSettings
from tests.support.nats_process import NatsServer, free_port
from tests.support.paths import REPO_ROOT

START_TIMEOUT_S = 90.0


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) for every sample of a Prometheus text exposition."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


@dataclass
class ServiceProcess:
    """One service subprocess; `port` is its HTTP port (API, or the worker's /metrics)."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    # Sent with /metrics scrapes: per-key series need an operator key when auth is on.
    metrics_headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines (others, e.g. tracebacks, are skipped)."""
        events = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    events.append(obj)
        return events

    def get(
        self, path: str, timeout: float = 10.0, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout, headers=headers)

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        resp = self.get("/metrics", headers=self.metrics_headers)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            value
            for sample, sample_labels, value in self.metrics()
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def wait_http(self, path: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                resp = self.get(path, timeout=2.0)
                if resp.status_code == 200:
                    return
                last = f"{resp.status_code} {resp.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} {path} not 200 after {timeout}s ({last}):\n{self.log()[-4000:]}"
        )

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL if it does not exit in time); the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Stack:
    """nats-server plus any number of workers and APIs, all real processes."""

    root: Path
    model_dir: Path
    nats: NatsServer
    services: list[ServiceProcess] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra env for every service

    @classmethod
    def create(cls, root: Path, model_dir: Path, secured: bool = False) -> Stack:
        """`secured`: NATS requires the launcher's identities; workers and APIs use theirs."""
        root.mkdir(parents=True, exist_ok=True)
        server = NatsServer(root / "nats", secured=secured)
        server.start()
        return cls(root=root, model_dir=model_dir, nats=server)

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def workers(self) -> list[ServiceProcess]:
        return [s for s in self.services if s.name.startswith("worker")]

    @property
    def apis(self) -> list[ServiceProcess]:
        return [s for s in self.services if s.name.startswith("api")]

    @property
    def worker(self) -> ServiceProcess:
        return self.workers[0]

    @property
    def api(self) -> ServiceProcess:
        return self.apis[0]

    def _spawn(self, name: str, args: list[str], port: int, env: dict[str, str] | None):
        log_dir = self.root / "logs"
        log_dir.mkdir(exist_ok=True)
        log_path = log_dir / f"{name}.log"
        full_env = {
            **os.environ,
            "JETSERVE_LOG_JSON": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # Several services share 2 cores in CI; one torch thread each avoids thrashing.
            "OMP_NUM_THREADS": "1",
            # API keys are on by default for `jetserve api`; tests/integration/gateway turns them on.
            "JETSERVE_AUTH": "0",
            **(self.nats.identity_env(name.rstrip("0123456789")) if self.nats.secured else {}),
            **self.env,
            **(env or {}),
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *args],
                cwd=REPO_ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        svc = ServiceProcess(name=name, proc=proc, port=port, log_path=log_path)
        self.services.append(svc)
        return svc

    def start_worker(
        self,
        *extra_args: str,
        model_dir: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> ServiceProcess:
        """`jetserve worker` on the stack's model; extra_args are CLI flags."""
        port = free_port()
        name = f"worker{len(self.workers)}"
        args = [
            "worker",
            "--model", str(model_dir or self.model_dir),
            "--nats-url", self.nats_url,
            "--metrics-host", "127.0.0.1",
            "--metrics-port", str(port),
            "--worker-id", f"{name}-{uuid.uuid4().hex[:6]}",
            *extra_args,
        ]  # fmt: skip
        svc = self._spawn(name, args, port, env)
        if wait:
            svc.wait_http("/health")
        return svc

    def start_api(
        self, *extra_args: str, env: dict[str, str] | None = None, wait: bool = True
    ) -> ServiceProcess:
        """`jetserve api`; waits for /ready (NATS connected and a live worker)."""
        port = free_port()
        name = f"api{len(self.apis)}"
        args = ["api", "--nats-url", self.nats_url, "--host", "127.0.0.1", "--port", str(port),
                *extra_args]  # fmt: skip
        svc = self._spawn(name, args, port, env)
        if wait:
            svc.wait_http("/ready")
        return svc

    def close(self) -> None:
        for svc in reversed(self.services):
            svc.stop(timeout=20)
        self.nats.stop()


class BusClient:
    """The API's side of the bus, for tests that talk to workers directly."""

    def __init__(self, nc: nats.NATS, model: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.model = model

    @classmethod
    async def connect(cls, url: str, model: str) -> BusClient:
        nc = await nats.connect(url)
        await ensure_streams(nc.jetstream(), BusSettings())
        return cls(nc, model)

    async def close(self) -> None:
        await self.nc.close()

    def make_job(
        self, prompt_token_ids: list[int], job_id: str | None = None, **sampling: Any
    ) -> Job:
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        return Job(
            id=job_id,
            model=self.model,
            prompt_token_ids=prompt_token_ids,
            sampling=SamplingParams(**sampling),
            created_at=time.time(),
            reply_to=events_subject(job_id),
        )

    async def submit(self, job: Job) -> None:
        await self.js.publish(
            jobs_subject(job.model), encode_job(job), headers={"Nats-Msg-Id": job.id}
        )

    async def publish_raw(self, data: bytes, msg_id: str | None = None) -> None:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(jobs_subject(self.model), data, headers=headers)

    async def cancel(self, job_id: str) -> None:
        await self.nc.publish(cancel_subject(job_id), b"")
        await self.nc.flush()

    async def deltas(
        self, job_id: str, timeout_s: float = 60.0, past_errors: bool = False
    ) -> AsyncIterator[Delta]:
        """Every Delta of the job from the start of LLM_EVENTS, until the finished one
        (with `past_errors`, until one that finished without error: a dead-lettered job
        that is replayed goes on after its error Delta)."""
        sub = await self.js.subscribe(
            events_subject(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s")
                msg = await sub.next_msg(timeout=remaining)
                delta = decode_delta(msg.data)
                yield delta
                if delta.finished and not (past_errors and delta.error):
                    return
        finally:
            with contextlib.suppress(Exception):  # the connection may be closed by now
                await sub.unsubscribe()

    async def collect(self, job_id: str, timeout_s: float = 60.0) -> list[Delta]:
        return [d async for d in self.deltas(job_id, timeout_s)]

    async def consumer(self) -> ConsumerInfo:
        return await self.js.consumer_info(JOBS_STREAM, consumer_name(self.model))

    async def jobs_in_stream(self) -> int:
        info = await self.js.stream_info(JOBS_STREAM, subjects_filter=jobs_subject(self.model))
        return int((info.state.subjects or {}).get(jobs_subject(self.model), 0))

    async def workers(self) -> list[WorkerStatus]:
        kv = await workers_bucket(self.js, BusSettings())
        return await live_workers(kv, self.model)


def tokens_by_index(deltas: list[Delta]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in deltas:
        for c in d.chunks:
            out.setdefault(c.index, []).extend(c.token_ids)
    return out


def finish_reasons(deltas: list[Delta]) -> dict[int, str]:
    return {c.index: c.finish_reason for d in deltas for c in d.chunks if c.finish_reason}
