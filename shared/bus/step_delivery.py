"""A worker's stored Deltas of one engine step, sent to the API replicas that follow them.

The API replica that streams a job names its step subject in the Job's `reply_to`
(`llm.steps.<replica>`). Once a step's Deltas are stored in LLM_EVENTS, the worker sends
each such replica the ones for its jobs as one core message, so a replica reads one
message per step however many of its streams the step fed, instead of one re-published
message (with its headers) per job. Core delivery is at most once, and only what is
stored is sent: a replica that misses one notices a gap or silence and catches up from
the log, as it would with the re-published Deltas.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.aio.client import Client as NATS

from shared.bus.subjects import is_steps_subject
from shared.messages import encode_step_deltas

# Well under nats-server's default max_payload (1 MiB): a step of many large Deltas
# (logprobs, embeddings) is split over several messages.
STEP_MESSAGE_BYTES = 256 * 1024


def step_messages(stored: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """(reply_to, encoded Delta) of stored Deltas -> (subject, payload) to publish, in
    the order given per subject; Deltas no replica follows live are left out."""
    groups: dict[str, list[list[bytes]]] = {}
    sizes: dict[str, int] = {}
    unfollowed: set[str] = set()  # a subject is checked once a step, not once a Delta
    for subject, data in stored:
        parts = groups.get(subject)
        if parts is None:
            if subject in unfollowed or not is_steps_subject(subject):
                unfollowed.add(subject)
                continue
            parts = groups[subject] = [[]]
            sizes[subject] = 0
        if parts[-1] and sizes[subject] + len(data) > STEP_MESSAGE_BYTES:
            parts.append([])
            sizes[subject] = 0
        parts[-1].append(data)
        sizes[subject] += len(data)
    return [(s, encode_step_deltas(p)) for s, parts in groups.items() for p in parts]


async def deliver_step(nc: NATS, stored: Iterable[tuple[str, bytes]]) -> int:
    """Publish a step's stored Deltas to their replicas; how many messages went out.

    A failure is not retried: the Deltas are stored, and a replica that misses them
    reads them from the log.
    """
    sent = 0
    for subject, payload in step_messages(stored):
        try:
            await nc.publish(subject, payload)
            sent += 1
        except Exception:  # disconnected: the log has them
            continue
    return sent
