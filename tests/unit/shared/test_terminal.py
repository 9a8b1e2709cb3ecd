"""The progress bar redraws one line on a terminal and stays silent on a pipe."""

from __future__ import annotations

import io
import os
import pty

from shared.terminal import ByteProgress, ProgressBar, human_bytes


def test_on_a_pipe_only_the_said_lines_are_written() -> None:
    out = io.StringIO()
    bar = ProgressBar(total=4, label="training", stream=out)
    for step in range(1, 5):
        bar.update(step, f"loss {1 / step:.2f}")
    bar.say("step 4/4 loss 0.25")
    bar.close()
    assert out.getvalue() == "step 4/4 loss 0.25\n"


def test_on_a_terminal_the_bar_redraws_in_place() -> None:
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as stream:
            bar = ProgressBar(total=4, label="training", stream=stream)
            bar.update(2, "loss 0.50")
            bar.say("halfway")
            bar.update(4)
            bar.close()
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the writer side is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
        written = b"".join(chunks).decode()
    finally:
        os.close(master)
    assert written.count("\r") >= 3  # each update and the say return to the line start
    assert "training [" + "#" * 15 + "-" * 15 + "] 2/4" in written
    assert "halfway" in written and "4/4" in written
    assert written.endswith("\n")  # the terminal turns it into \r\n


def test_a_transfer_counts_bytes_and_reads_them_for_people() -> None:
    out = io.StringIO()
    progress = ByteProgress.start(3 * 1024 * 1024, "fetching m", enabled=True)
    assert progress.bar is not None
    progress.bar.stream = out
    progress.update(1024 * 1024)
    progress.callback(1024 * 1024)
    assert progress.bar.done == 2 * 1024 * 1024
    assert progress.bar.render().startswith(
        "fetching m [" + "#" * 20 + "-" * 10 + "] 2.0 MiB/3.0 MiB"
    )
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB"


def test_a_transfer_off_a_terminal_draws_nothing() -> None:
    progress = ByteProgress.start(100, "pushing m", enabled=False)
    progress.update(50)
    progress.close()
    assert progress.bar is None
