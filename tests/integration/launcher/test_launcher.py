"""`jetserve up`: one command brings up nats-server, a worker and the API; Ctrl-C stops all."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai

from services.launcher import port_in_use
from tests.support.nats_process import free_port
from tests.support.paths import REPO_ROOT


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def test_up_serves_the_default_model_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, tiny_llama: Path
) -> None:
    # The default model comes from JETSERVE_DEMO_MODEL_DIR; a complete folder is not rebuilt.
    demo = tmp_path / "models" / "demo-model"
    shutil.copytree(tiny_llama, demo)
    (demo / "special_tokens_map.json").write_text("{}")
    api_port, nats_port, metrics_port = free_port(), free_port(), free_port()
    data_dir = tmp_path / "data"
    env = {**os.environ, "JETSERVE_DEMO_MODEL_DIR": str(demo), "OMP_NUM_THREADS": "1",
           "JETSERVE_LOG_LEVEL": "warning"}  # fmt: skip
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--host", "127.0.0.1",
         "--port", str(api_port), "--nats-port", str(nats_port),
         "--metrics-port", str(metrics_port), "--data-dir", str(data_dir)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)
            assert line is not None, (tmp_path / "up.log").read_text()
            found = re.search(r"jetserve is up: (\S+)", line)
            url = found.group(1) if found else None
        assert url == f"http://127.0.0.1:{api_port}/v1"

        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["demo-model"]
        out = client.completions.create(
            model="demo-model", prompt="The quick brown fox", max_tokens=5, temperature=0
        )
        assert out.usage.completion_tokens == 5
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'jetserve:generation_tokens_total{model_name="demo-model"} 5.0' in metrics
        assert (data_dir / "nats" / "jetstream").is_dir()  # JetStream state in the data dir
        for port in (api_port, nats_port, metrics_port):  # auth is off: this machine only
            assert listening_addresses(port) == {"127.0.0.1"}, port

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        for port in (api_port, nats_port, metrics_port):
            assert not port_in_use(port), f"port {port} still served after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_up_refuses_a_busy_port(tmp_path: Path, tiny_llama: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "up", "--model", str(tiny_llama),
             "--nats-port", str(port), "--data-dir", str(tmp_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} for NATS is in use" in result.stderr


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket listening on `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # host-order words
            found.add(
                socket.inet_ntop(
                    socket.AF_INET if len(raw) == 4 else socket.AF_INET6, b"".join(words)
                )
            )
    return found
