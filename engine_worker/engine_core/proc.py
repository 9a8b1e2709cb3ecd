"""The engine process: `python -m engine_worker.engine_core.proc FD PARENT_PID`.

Spawned by the worker (`client.EngineProcess`) as a fresh interpreter, never forked, so
CUDA may be initialised here whatever the worker did. It reads its settings from the
socket on FD, builds the engine (loading the model here, not in the worker), answers
with EngineInfo, then runs the engine core: commands in between steps, one frame per
step out, encoded and sent by an output thread while the engine runs its next step (as
vLLM's EngineCoreProc does), so the encoding is off the step's critical path. It lives only as long as its worker: it asks the kernel for SIGKILL when its
parent dies (Linux), leaves when the socket closes, and ignores SIGINT/SIGTERM, which
a terminal or a service manager also sends to the worker's children: the worker drains
and then stops its engine itself.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import sys
import threading
from collections import deque
from typing import Any

from engine_worker.engine.outputs import EngineStats
from engine_worker.engine_core import codec
from engine_worker.engine_core.core import EngineCore, engine_info
from engine_worker.engine_core.frames import FrameDecoder, frame, read_frames, read_ready
from engine_worker.engine_core.messages import Command, StepResult, Stop
from shared.gc_tuning import tune_gc
from shared.logging import configure_logging, get_logger

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the worker dies, however it dies (Linux; elsewhere the
    closed socket ends the loop at the next step)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the worker died before the request took effect
        os._exit(1)


class SocketCommands:
    """The core's command source here: frames of commands from the worker's socket."""

    def __init__(self, sock: socket.socket, decoder: FrameDecoder, early: list[bytes]) -> None:
        self._sock = sock
        self._decoder = decoder
        self._frames: deque[bytes] = deque(early)

    def get(self, wait_s: float) -> list[Command]:
        if not self._frames:
            data = read_ready(self._sock, wait_s)
            if data is None:
                return [Stop()]  # the worker closed the link (or died): nothing more to do
            self._frames.extend(self._decoder.feed(data))
        commands: list[Command] = []
        while self._frames:
            batch = codec.decode(self._frames.popleft())
            if not isinstance(batch, list):
                raise codec.CodecError(f"expected commands, got {type(batch).__name__}")
            commands.extend(batch)
        return commands


def _send(sock: socket.socket, payload: bytes) -> bool:
    try:
        sock.sendall(frame(payload))
    except OSError:
        return False  # the worker is gone
    return True


class Sender:
    """The core's sink here: results are encoded and sent on an output thread, in order,
    while the engine steps on (its device wait releases the GIL)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: queue.SimpleQueue[StepResult | None] = queue.SimpleQueue()
        self._open = True
        self._thread = threading.Thread(target=self._run, name="engine-output", daemon=True)
        self._thread.start()

    def post(self, result: StepResult) -> bool:
        if self._open:
            self._queue.put(result)
        return self._open

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (result := self._queue.get()) is not None:
            if self._open and not _send(self._sock, codec.encode_step(result)):
                self._open = False  # the worker is gone: the core stops at its next post


def _build(settings: dict[str, Any]) -> Any:
    from engine_worker.engine.config import EngineConfig
    from engine_worker.engine.factory import build_engine

    threads = settings.get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    engine = build_engine(EngineConfig(**settings["engine"]))
    engine.eos_token_ids |= set(settings.get("extra_eos_token_ids") or ())
    if settings.get("record_kv_changes"):
        engine.block_manager.record_kv_changes()
    return engine


def serve(sock: socket.socket) -> int:
    decoder = FrameDecoder()
    frames = read_frames(sock, decoder)
    if frames is None:
        return 1
    settings = codec.decode(frames[0])
    if not isinstance(settings, dict):
        raise codec.CodecError("the engine process's first message must be its settings")
    configure_logging(settings.get("log_level", "info"), json=settings.get("log_json"))
    log = get_logger("engine_worker.engine_core").bind(**settings.get("log_context", {}))
    try:
        engine = _build(settings)
        info = engine_info(engine)
    except Exception as e:  # a bad model, out of memory: the worker says it and exits
        stats = EngineStats(0, 0, 0, 0, 0.0, 0.0, 0)
        failed = StepResult([], stats, 0, 0, fatal=f"{type(e).__name__}: {e}")
        _send(sock, codec.encode_step(failed))
        return 1
    if not _send(sock, codec.encode_info(info)):
        return 1
    tune_gc()
    log.info("engine_process_ready", pid=os.getpid())
    sender = Sender(sock)
    core = EngineCore(
        engine,
        SocketCommands(sock, decoder, frames[1:]),
        sender.post,
        idle_wait_s=float(settings.get("idle_wait_s", 0.5)),
    )
    try:
        core.run()
    finally:
        sender.close()
    return 1 if core.failed else 0


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=fd) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
