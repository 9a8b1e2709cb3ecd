"""The worker's handle on an engine core in its own process (`--engine-process`).

The same interface as EngineThread (start, add, abort, stop, join, alive, a StepResult
per step handed to `on_result` on the event loop), with the engine in a child process
(`proc`) spawned as a fresh interpreter, never forked. Commands given during one turn
of the event loop go out as one frame; each engine step comes back as one frame, read
by an asyncio protocol (the loop never blocks on the socket) and decoded on the loop.

Failure is loud, as with a thread: an engine exception arrives as a fatal StepResult,
and a child that dies without one (killed, out of memory, a crash in native code)
becomes a fatal StepResult naming its exit status, unless the worker had asked it to
stop. The child dies with its worker (proc.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine_worker.engine_core import codec
from engine_worker.engine_core.frames import FrameDecoder, FrameError, frame
from engine_worker.engine_core.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineInfo,
    StepResult,
    Stop,
)

PROC_MODULE = "engine_worker.engine_core.proc"
# The folder that holds engine_worker/: the child imports the code its parent runs.
CODE_ROOT = str(Path(__file__).resolve().parents[2])


class EngineFailed(RuntimeError):
    """The engine process could not be started or did not build its engine."""


def exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status yet"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if CODE_ROOT not in paths:
        env["PYTHONPATH"] = os.pathsep.join([CODE_ROOT, *paths])
    return env


class _Link(asyncio.Protocol):
    """The worker's end of the socket: frames in, each handed to the EngineProcess."""

    def __init__(self, owner: EngineProcess) -> None:
        self._owner = owner
        self._decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            self._owner._broken(e)
            return
        for payload in frames:
            self._owner._received(payload)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost()


class EngineProcess:
    """Runs the engine core in a child process; `on_result` is called on `loop` per step.

    `settings` is what the child builds its engine from: {"engine": EngineConfig fields,
    "extra_eos_token_ids", "record_kv_changes", "log_level", "log_json", "log_context",
    "torch_threads", "idle_wait_s"}. Call `launch` (on the thread that outlives the child: the parent-death
    signal follows the thread that spawned it) before anything else.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        on_result: Callable[[StepResult], None],
        python: str = sys.executable,
    ) -> None:
        self._settings = settings
        self._loop = loop
        self._on_result = on_result
        self._python = python
        self._proc: subprocess.Popen | None = None
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[EngineInfo | str] = loop.create_future()
        self._outbox: list[Command] = []
        self._flush_pending = False
        self._stop_sent = False
        self._fatal_seen = False
        self._closed = False
        self._last: StepResult | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- start ------------------------------------------------------------------------
    async def launch(self, timeout_s: float | None = None) -> EngineInfo:
        """Spawn the engine process and wait until its engine is built."""
        parent_sock = self._spawn()
        self._transport, _ = await self._loop.create_unix_connection(
            lambda: _Link(self), sock=parent_sock
        )
        self._transport.write(frame(codec.encode_init(self._settings)))
        self._flush()
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except BaseException:
            self.kill()
            raise
        if isinstance(ready, str):
            rc = await asyncio.to_thread(self._wait, 10.0)
            raise EngineFailed(f"the engine process failed to start ({exit_status(rc)}): {ready}")
        self._last = ready.snapshot
        return ready

    def _spawn(self) -> socket.socket:
        """Start the child with one end of a socket pair; the worker's end is returned.

        On this thread, on purpose: the child's parent-death signal fires when the thread
        that spawned it ends, so it must be the event loop's, which lives as long as the
        worker (fork and exec take milliseconds; the child loads its model on its own).
        """
        parent_sock, child_sock = socket.socketpair()
        try:
            fd = child_sock.fileno()
            self._proc = subprocess.Popen(
                [self._python, "-m", PROC_MODULE, str(fd), str(os.getpid())],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        return parent_sock

    def start(self) -> None:
        """Nothing to start: the engine process steps as soon as it has work."""

    # -- called from the event loop ---------------------------------------------------
    def add(self, request: AddRequest) -> None:
        self._send(request)

    def abort(self, request_id: str) -> None:
        self._send(AbortRequest(request_id))

    def stop(self) -> None:
        self._stop_sent = True
        self._send(Stop())

    def join(self, timeout: float | None = None) -> bool:
        """True once the engine process has exited (blocking: call it off the loop)."""
        return self._proc is None or self._wait(timeout) is not None

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._closed and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- the link ---------------------------------------------------------------------
    def _wait(self, timeout: float | None) -> int | None:
        assert self._proc is not None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _send(self, command: Command) -> None:
        """Queue a command; one frame carries all those given in this turn of the loop."""
        self._outbox.append(command)
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        transport = self._transport
        if transport is None or not self._outbox:
            return  # not connected yet: launch flushes
        commands, self._outbox = self._outbox, []
        if not transport.is_closing():
            transport.write(frame(codec.encode_commands(commands)))

    def _received(self, payload: bytes) -> None:
        try:
            message = codec.decode(payload)
        except codec.CodecError as e:
            self._broken(e)
            return
        if isinstance(message, EngineInfo):
            if not self._ready.done():
                self._ready.set_result(message)
            return
        if not isinstance(message, StepResult):
            self._broken(codec.CodecError(f"unexpected {type(message).__name__} from the engine"))
            return
        if not self._ready.done():  # it failed to build its engine
            self._fatal_seen = True
            self._ready.set_result(message.fatal or "no engine info")
            return
        self._deliver(message)

    def _deliver(self, result: StepResult) -> None:
        if self._fatal_seen:
            return  # one failure report is enough
        self._fatal_seen = result.fatal is not None
        self._last = result
        try:
            self._on_result(result)
        except Exception as e:  # as a loop callback's would be: logged, the link goes on
            self._loop.call_exception_handler(
                {"message": "engine result handler failed", "exception": e}
            )

    def _broken(self, error: Exception) -> None:
        """The byte stream is corrupt: nothing after this can be trusted."""
        self.kill()
        self._report(f"the engine link broke: {type(error).__name__}: {error}")
        if self._transport is not None:
            self._transport.close()

    def _lost(self) -> None:
        self._closed = True
        if not self._ready.done():
            self._ready.set_result("it exited before its engine was built")
            return
        if self._fatal_seen or self._stop_sent:
            return
        task = self._loop.create_task(self._report_exit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report_exit(self) -> None:
        rc = await asyncio.to_thread(self._wait, 5.0)
        self._report(f"the engine process (pid {self.pid}) exited unexpectedly: {exit_status(rc)}")

    def _report(self, error: str) -> None:
        if not self._ready.done():
            self._ready.set_result(error)
            return
        if self._fatal_seen:
            return
        last = self._last
        assert last is not None
        self._deliver(StepResult([], last.stats, 0, last.adds_applied, fatal=error))
