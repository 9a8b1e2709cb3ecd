"""The engine worker process (`jetserve worker`): JetStream jobs in, Deltas out.

One asyncio loop talks to NATS; the engine runs in a thread (engine_thread.py, the
default) or in a child process (--engine-process, engine_worker/engine_core/client.py).
This module wires the parts together and runs them: intake.py pulls and admits jobs,
the engine steps them, step_results.py turns each step into Deltas, outbox.py
stores them in LLM_EVENTS and settles the jobs' messages; the janitor dead-letters what
the server stopped delivering (see docs/durability.md). Here: connect, start, the
periodic work (in-progress acks and deadlines, the registry heartbeat), health, and the
shutdown: SIGTERM stops pulling, lets running jobs finish for `drain_timeout_s`, and
hands the rest back (nak) for another worker to take over. An engine failure hands its
jobs back the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS

from engine_worker.engine_core.client import EngineProcess
from engine_worker.engine_core.handle import EngineHandle
from engine_worker.engine_core.messages import EngineInfo, StepResult
from engine_worker.worker.cancel_memory import CancelMemory
from engine_worker.worker.intake import FETCH_WAIT_S, Intake
from engine_worker.worker.janitor import Janitor
from engine_worker.worker.model_facts import ModelFacts
from engine_worker.worker.model_source import resolve_model
from engine_worker.worker.outbox import APPEND_RETRY_S, Outbox
from engine_worker.worker.routing.fallback import RoutedSweeper, is_routed, num_delivered
from engine_worker.worker.routing.kv_announcer import KvAnnouncer
from engine_worker.worker.running import RunningJobs
from engine_worker.worker.status_server import StatusServer
from engine_worker.worker.step_results import count_speculation, step_deltas
from shared.bus.jetstream import (
    ensure_jobs_consumer,
    ensure_routed_consumer,
    ensure_streams,
    models_object_store,
)
from shared.bus.jetstream import workers_bucket as open_workers_bucket
from shared.bus.nats_connect import connect_nats
from shared.bus.subjects import (
    JOBS_STREAM,
    consumer_name,
    jobs_subject,
    model_object_name,
    routed_consumer_name,
    routed_jobs_subject,
)
from shared.bus.worker_registry import WorkerStatus, delete_status, put_status
from shared.gc_tuning import tune_gc
from shared.logging import configure_logging, get_logger
from shared.messages import JOB_READERS, JobReader
from shared.metrics import new_registry, worker_metrics
from shared.periodic import Periodic
from shared.settings import EngineSettings, WorkerSettings, add_flags
from shared.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from engine_worker.engine.config import EngineConfig

# An engine thread (--no-engine-process) drops the GIL in every torch op and must win it
# back from the event loop each time; at the default 5 ms switch interval a busy loop (Deltas for dozens of
# streams) makes each re-acquire wait up to 5 ms. Process-wide, so set by the process
# entry point (`run`), never by constructing an engine or a Worker.
GIL_SWITCH_INTERVAL_S = 0.0005


def engine_fields(settings: WorkerSettings) -> dict[str, Any]:
    """The worker's engine settings plus its model: EngineConfig's fields."""
    fields = {name: getattr(settings, name) for name in EngineSettings.model_fields}
    return {"model": settings.model, **fields}


def engine_config(settings: WorkerSettings) -> EngineConfig:
    from engine_worker.engine.config import EngineConfig  # torch: only where the engine runs

    return EngineConfig(**engine_fields(settings))


class Worker:
    def __init__(
        self, settings: WorkerSettings, job_readers: Mapping[int, JobReader] = JOB_READERS
    ) -> None:
        """`job_readers`: the Job wire versions this worker reads (docs/upgrading.md)."""
        settings.validate()
        self.job_readers = job_readers
        self.settings = settings
        self.model_name = settings.served_name
        self.worker_id = settings.worker_id
        self.log = get_logger("engine_worker").bind(worker_id=self.worker_id, model=self.model_name)
        self.registry = new_registry()
        self.metrics = worker_metrics(self.registry)
        self.jobs = RunningJobs()
        self.exit_code = 0
        self.started_at = time.time()
        self.status_server = StatusServer(
            self.registry, self.health, settings.metrics_host, settings.metrics_port
        )
        # Built by start(), in this order; shutdown() copes with any of them missing.
        self.engine_thread: EngineHandle | None = None  # a thread or a child process
        self.info: EngineInfo | None = None
        self.facts: ModelFacts | None = None
        self.snapshot: StepResult | None = None
        self.nc: NATS | None = None
        self.outbox: Outbox | None = None
        self.intake: Intake | None = None
        self.janitor: Janitor | None = None
        self.kv_announcer: KvAnnouncer | None = None
        self._kv: Any = None
        self._routed_sub: Any = None
        self._fatal: str | None = None
        self._stopping = asyncio.Event()
        self._shut_down = False
        self._puller: asyncio.Task | None = None
        self._publisher: asyncio.Task | None = None
        self._periodic: list[Periodic] = []

    # -- start ------------------------------------------------------------------------
    async def start(self) -> None:
        await self._start_status_server()
        self.log.info(
            "worker_loading",
            model_dir=self.settings.model,
            engine_process=self.settings.engine_process,
        )
        tokenizer_files: dict[str, bytes] = {}
        eos_token_ids: set[int] = set()
        try:
            tokenizer = load_tokenizer(self.settings.model)
            eos_token_ids = set(tokenizer.eos_token_ids)  # the engine stops on them too
            tokenizer_files = tokenizer.files()
        except ValueError as e:
            self.log.warning("no_tokenizer", error=str(e))
        info = await self._start_engine(eos_token_ids)
        self.info, self.facts, self.snapshot = info, info.facts, info.snapshot

        self.nc = await self._connect()
        js = self.nc.jetstream()
        await ensure_streams(js, self.settings)
        await ensure_jobs_consumer(js, self.model_name, self.settings)
        sub = await js.pull_subscribe_bind(
            durable=consumer_name(self.model_name), stream=JOBS_STREAM
        )
        # This worker's own subject: jobs an API routed here for their cached prefix.
        await ensure_routed_consumer(js, self.model_name, self.worker_id, self.settings)
        self._routed_sub = await js.pull_subscribe_bind(
            durable=routed_consumer_name(self.model_name, self.worker_id), stream=JOBS_STREAM
        )
        self._kv = await open_workers_bucket(js, self.settings)
        obs = await models_object_store(js, self.settings)
        for name, data in tokenizer_files.items():
            await obs.put(model_object_name(self.model_name, name), data)

        self.kv_announcer = KvAnnouncer(
            self.nc, self.model_name, self.worker_id, info.block_size, self.log
        )
        await self.kv_announcer.start()
        self.outbox = Outbox(
            self.nc,
            js,
            self.jobs,
            self.engine_thread.abort,
            self.metrics,
            self.model_name,
            self.log,
        )
        self.intake = Intake(
            nc=self.nc,
            sub=sub,
            jobs=self.jobs,
            outbox=self.outbox,
            engine=self.engine_thread,
            snapshot=self.snapshot,
            stopping=self._stopping,
            model_name=self.model_name,
            worker_id=self.worker_id,
            max_deliver=self.settings.max_deliver,
            cancelled=CancelMemory(ttl_s=self.settings.cancel_memory_s),
            metrics=self.metrics,
            log=self.log,
            job_readers=self.job_readers,
            defer_s=self.settings.ack_wait_s,
            routed_sub=self._routed_sub,
            ack_wait_s=self.settings.ack_wait_s,
        )
        self.outbox.on_log_found = self.intake.restart_from_log
        await self.intake.subscribe_cancels()
        self.janitor = Janitor(
            nc=self.nc,
            js=js,
            model=self.model_name,
            worker_id=self.worker_id,
            sweep_interval_s=max(self.settings.ack_wait_s, 5.0),
            retry_for_s=APPEND_RETRY_S,
            log=self.log,
            on_dead=self.intake.count_dead,
        )
        await self.janitor.start()

        self._update_gauges()
        await self._heartbeat()  # registered before it says it is ready
        self._publisher = asyncio.create_task(self.outbox.run(), name="publisher")
        self._puller = asyncio.create_task(self.intake.pull_loop(), name="puller")
        every = self.settings.heartbeat_interval_s
        self._periodic = [
            Periodic("heartbeat", self._heartbeat, every, first_now=False, log=self.log),
            # In-progress acks every ack_wait/3 keep long jobs from being redelivered.
            Periodic("keepalive", self._keepalive, self.settings.ack_wait_s / 3, log=self.log),
            # Routed jobs that wait too long, or whose worker is gone, go to the shared queue.
            Periodic(
                "routed-sweep",
                RoutedSweeper(
                    self.nc, js, self._kv, self.model_name, self.worker_id, self.settings,
                    self.metrics, self.log,
                ).sweep,
                self.settings.route_fallback_s / 2,
                first_now=False,
                log=self.log,
            ),
        ]  # fmt: skip
        for periodic in self._periodic:
            periodic.start()
        tune_gc()
        self.log.info(
            "worker_ready",
            subject=jobs_subject(self.model_name),
            metrics_port=self.status_server.port,
            max_model_len=info.max_model_len,
            num_kv_blocks=info.snapshot.stats.num_total_blocks,
            max_num_seqs=self.settings.max_num_seqs,
        )

    async def _start_engine(self, eos_token_ids: set[int]) -> EngineInfo:
        """The engine in a child process (the model loads there), or in a thread."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        if settings.engine_process:
            process = EngineProcess(
                {
                    "engine": engine_fields(settings),
                    "extra_eos_token_ids": sorted(eos_token_ids),
                    "torch_threads": settings.engine_threads,
                    "log_level": settings.log_level,
                    "log_json": settings.log_json,
                    "log_context": {"worker_id": self.worker_id, "model": self.model_name},
                    "record_kv_changes": True,  # each step's prefix-cache changes come back
                },
                loop,
                self._on_step,
            )
            self.engine_thread = process  # set first: shutdown stops it if launch fails
            info = await process.launch()
            self.log.info("engine_process_started", pid=process.pid)
            return info

        from engine_worker.engine.factory import build_engine
        from engine_worker.engine_core.core import engine_info
        from engine_worker.worker.engine_thread import EngineThread

        if settings.engine_threads:
            import torch

            torch.set_num_threads(settings.engine_threads)
        engine = await asyncio.to_thread(build_engine, engine_config(settings))
        engine.eos_token_ids |= eos_token_ids  # as the offline LLM does
        engine.block_manager.record_kv_changes()  # each step's changes, for the KV announcer
        thread = EngineThread(engine, loop, self._on_step)
        thread.start()  # started at once: shutdown joins it
        self.engine_thread = thread
        return await asyncio.to_thread(engine_info, engine)

    async def _connect(self) -> NATS:
        """Wait for NATS a while, so a worker may start before its nats-server."""
        return await connect_nats(
            self.settings.nats_url,
            f"jetserve-worker-{self.worker_id}",
            self.settings.nats_connect_timeout_s,
            error_cb=self._on_nats_error,
            identity=self.settings,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )

    async def _on_nats_error(self, e: Exception) -> None:
        self.log.warning("nats_error", error=str(e))

    async def _on_disconnected(self) -> None:
        self.log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        self.log.info("nats_reconnected")

    async def _start_status_server(self) -> None:
        """A default port that is busy (another worker on this host) falls back to a free
        one; a port the person chose is theirs or an error."""
        wanted = self.settings.metrics_port
        try:
            await self.status_server.start(
                fall_back_when_busy=not self.settings.is_set("metrics_port")
            )
        except OSError as e:
            raise OSError(
                f"--metrics-port / JETSERVE_WORKER_METRICS_PORT {wanted} cannot be bound "
                f"({e.strerror}); choose another, or leave it unset to take a free one"
            ) from None
        if wanted != 0 and self.status_server.port != wanted:
            self.log.warning("metrics_port_busy", wanted=wanted, port=self.status_server.port)

    # -- run and stop -----------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stopping.is_set():
            self.log.info("worker_stopping", running_jobs=len(self.jobs))
            self._stopping.set()

    async def run(self) -> int:
        """Start, serve until a stop is requested, shut down; the process exit code."""
        try:
            await self.start()
        except Exception as e:
            self.log.error("worker_start_failed", error=f"{type(e).__name__}: {e}")
            self.exit_code = 1
        else:
            await self._stopping.wait()
        finally:
            await self.shutdown()
        return self.exit_code

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self._stopping.set()
        if self._puller is not None:
            await asyncio.wait([self._puller], timeout=FETCH_WAIT_S + 2)
            self._puller.cancel()
        if self.janitor is not None:
            await self.janitor.stop()
        await self._move_routed_backlog()
        if self._fatal is None:
            await self.jobs.wait_empty(self.settings.drain_timeout_s)
        # Hand unfinished jobs back: forget them first so their abort output is not published.
        # Their Deltas still queued are stored first, so whoever takes over continues after.
        handed_back = self.jobs.take_all()
        if self.engine_thread is not None:
            for state in handed_back:
                self.engine_thread.abort(state.request_id)
            self.engine_thread.stop()
            stopped = await asyncio.to_thread(self.engine_thread.join, 30)
            if not stopped and isinstance(self.engine_thread, EngineProcess):
                self.engine_thread.kill()  # stuck in a step: it must not outlive us
        if self.outbox is not None and self._publisher is not None:
            self.outbox.close()
            await asyncio.wait([self._publisher], timeout=10)
        for state in handed_back:
            if state.lost:
                continue
            if self.intake is not None and is_routed(state.msg, self.model_name):
                # Routed: straight to the shared queue (a nak would wait for a sweeper).
                if await self.intake.move_routed(state.msg, num_delivered(state.msg), "drain"):
                    continue
            with contextlib.suppress(Exception):
                await state.msg.nak()
        if handed_back:
            self.log.info("jobs_handed_back", job_ids=[s.id for s in handed_back])
        await asyncio.gather(*(periodic.stop() for periodic in self._periodic))  # bounded
        if self.kv_announcer is not None:
            await self.kv_announcer.stop()
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await delete_status(self._kv, self.model_name, self.worker_id)
        if self.nc is not None and not self.nc.is_closed:
            # flush + close rather than drain: draining a pull subscription waits out
            # its last lingering fetch; everything we owe the server is already sent.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.flush(), 5)
            await self.nc.close()
        await self.status_server.stop()
        self.log.info("worker_stopped", exit_code=self.exit_code)

    async def _move_routed_backlog(self) -> None:
        """Stopping: jobs routed here and not pulled go to the shared queue now."""
        if self._routed_sub is None or self.intake is None:
            return
        moved = 0
        while True:
            try:
                msgs = await self._routed_sub.fetch(64, timeout=0.2)
            except Exception:
                break
            for msg in msgs:
                moved += await self.intake.move_routed(msg, num_delivered(msg) - 1, "drain")
        if moved:
            self.log.info("routed_backlog_moved", jobs=moved)

    # -- engine results (on the loop, posted by the engine thread) --------------------
    def _on_step(self, result: StepResult) -> None:
        if self.intake is None or self.outbox is None:
            # A result before NATS is connected (or after a failed connect): the engine
            # holds no job yet, so there is nothing to deliver.
            self.snapshot = result
            return
        before = self.snapshot.stats.spec if self.snapshot is not None else None
        count_speculation(before, result.stats.spec, self.metrics, self.model_name)
        self.snapshot = result
        self.intake.engine_stepped(result)
        self._update_gauges()
        if self.kv_announcer is not None and (result.kv_stored or result.kv_evicted):
            self.kv_announcer.on_step(result.kv_stored, result.kv_evicted)
            self.metrics.kv_events_published.labels(model_name=self.model_name).inc()
        if result.fatal is not None:
            self._fail_all(result.fatal)
            return
        for request_id, error in result.rejected:
            state = self.jobs.state_of(request_id)
            if state is not None:
                self.intake.reject(state, "invalid", error)
        self.outbox.enqueue(
            step_deltas(
                result,
                self.jobs,
                self.metrics,
                self.model_name,
                self.worker_id,
                self.settings.stream_interval,
            )
        )

    def _fail_all(self, error: str) -> None:
        """The engine raised: stop this worker; shutdown hands its jobs back (nak).

        The jobs may be fine on a healthy worker, which continues them from their stored
        Deltas; a job that breaks every engine runs out of deliveries and is dead-lettered.
        """
        if self._fatal is not None:
            return
        self._fatal = error
        self.exit_code = 1
        self.log.error("engine_failed", error=error, running_jobs=len(self.jobs))
        self.request_stop()

    # -- health, gauges, periodic work ------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        connected = self.nc is not None and self.nc.is_connected
        # Serving: its engine runs and it pulls jobs, which starts only once it has put its
        # first status in the registry (so a healthy worker is a registered one).
        serving = self._puller is not None
        ready = serving and self.engine_thread is not None and self.engine_thread.alive
        ok = connected and ready and self._fatal is None and not self._stopping.is_set()
        status = "ok" if ok else ("loading" if self.info is None else "unavailable")
        return ok, {
            "status": status,
            "worker_id": self.worker_id,
            "model": self.model_name,
            "nats_connected": connected,
            "running_jobs": len(self.jobs),
        }

    def _update_gauges(self) -> None:
        if self.snapshot is None:
            return
        s, m, name = self.snapshot.stats, self.metrics, self.model_name
        m.num_requests_running.labels(model_name=name).set(s.num_running)
        m.num_requests_waiting.labels(model_name=name).set(s.num_waiting)
        m.kv_cache_usage_perc.labels(model_name=name).set(s.kv_cache_usage)
        m.prefix_cache_hit_rate.labels(model_name=name).set(s.prefix_cache_hit_rate)
        m.num_free_blocks.labels(model_name=name).set(s.num_free_blocks)
        m.num_total_blocks.labels(model_name=name).set(s.num_total_blocks)
        m.num_preemptions.labels(model_name=name).set(s.num_preemptions)

    async def _keepalive(self) -> None:
        """In-progress acks keep ack_wait from expiring on long jobs; deadlines abort."""
        now = time.time()
        for state in self.jobs.states():
            deadline = state.job.deadline
            if deadline is not None and now > deadline and self.engine_thread is not None:
                self.engine_thread.abort(state.request_id)
            with contextlib.suppress(Exception):
                await state.msg.in_progress()

    def status(self) -> WorkerStatus:
        assert self.info is not None and self.snapshot is not None
        s = self.snapshot.stats
        return WorkerStatus(
            worker_id=self.worker_id,
            model=self.model_name,
            capacity=self.settings.max_num_seqs,
            max_model_len=self.info.max_model_len,
            kv_cache_usage=s.kv_cache_usage,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            metrics_port=self.status_server.port,
            started_at=self.started_at,
            updated_at=time.time(),
            block_size=self.info.block_size,
            routed_subject=routed_jobs_subject(self.model_name, self.worker_id),
            kv_epoch=self.kv_announcer.epoch if self.kv_announcer else 0,
            kv_seq=self.kv_announcer.seq if self.kv_announcer else 0,
            **(dataclasses.asdict(self.facts) if self.facts else {}),
        )

    async def _heartbeat(self) -> None:
        try:
            await put_status(self._kv, self.status())
        except Exception as e:
            self.log.warning("heartbeat_failed", error=str(e))


# -- `jetserve worker` ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, WorkerSettings)


async def serve(settings: WorkerSettings) -> int:
    try:
        settings = await resolve_model(settings)  # a local folder, or fetched from NATS
    except Exception as e:  # not in the store, corrupted, NATS unreachable: say so, exit 1
        get_logger("engine_worker").error("model_unavailable", model=settings.model, error=str(e))
        return 1
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    return await worker.run()


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings.from_args(args)  # a bad value: one error line, exit 2
    settings.validate()
    configure_logging(settings.log_level, json=settings.log_json)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # see GIL_SWITCH_INTERVAL_S
    return asyncio.run(serve(settings))
