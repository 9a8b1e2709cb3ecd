"""How busy a benchmark's box was: the load averages a result records, and the note that
tells its reader how to use them (these 2-core boxes are sometimes quiet, sometimes
shared, and a fixed claim either way was wrong half the time)."""

from __future__ import annotations

import os

LOAD_NOTE = (
    "how busy the box was is in the load averages recorded with this run (other jobs and "
    "this benchmark's own processes); compare its arms, not runs"
)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]
