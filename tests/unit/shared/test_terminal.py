"""The progress bar redraws one line on a terminal and stays silent on a pipe."""

from __future__ import annotations

import io
import os
import pty

from shared.terminal import ProgressBar


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
