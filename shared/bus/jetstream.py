"""Create the JetStream streams, consumer, KV bucket and object store both services use.

Idempotent on purpose: the API and every worker call `ensure_streams` at start-up, in
any order and concurrently, so no separate provisioning step is needed locally. In a
cluster the same calls converge the configuration (an existing stream is updated).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.bus.subjects import (
    DEAD_STREAM,
    DEAD_WILDCARD,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    JOB_RECORDS_BUCKET,
    JOBS_STREAM,
    JOBS_WILDCARD,
    MODELS_OBJECT_STORE,
    TOKENS_WILDCARD,
    WORKERS_BUCKET,
    consumer_name,
    jobs_subject,
    routed_consumer_name,
    routed_jobs_subject,
    routed_jobs_wildcard,
    worker_of_routed_subject,
)
from shared.settings import BusSettings

STREAM_IN_USE = 10058  # "stream name already in use with a different configuration"


def _duplicate_window(settings: BusSettings) -> float:
    if settings.queue_max_age_s > 0:
        return min(settings.jobs_duplicate_window_s, settings.queue_max_age_s)
    return settings.jobs_duplicate_window_s


def stream_configs(settings: BusSettings) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=JOBS_STREAM,
            subjects=[JOBS_WILDCARD],
            # Work-queue: a job is removed once acked, so the stream holds exactly the backlog.
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            # JetStream refuses a duplicate window longer than the stream's max age.
            duplicate_window=_duplicate_window(settings),
            # Bounded per model (subject) and in bytes: a full queue refuses the publish
            # (the API answers 429) instead of dropping queued jobs.
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=settings.queue_max_jobs,
            max_bytes=settings.queue_max_bytes,
            max_age=max(settings.queue_max_age_s, 0.0),  # 0: no age limit
            num_replicas=settings.stream_replicas,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_WILDCARD],
            # Limits + max_age: deltas stay replayable (re-attach, takeover) for a while.
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.events_max_age_s,
            num_replicas=settings.stream_replicas,
            # Every stored Delta is also published on llm.tokens.<job> (core): the API
            # that submitted the job follows it there, with no consumer per request.
            republish=RePublish(src=EVENTS_WILDCARD, dest=TOKENS_WILDCARD),
            # A worker stores an engine step's Deltas (one per job, each on its job's
            # subject and fenced) with one atomic batch and one ack (nats-server 2.12+).
            allow_atomic=True,
            allow_direct=True,  # job status and takeover read a job's log in batched gets
        ),
        StreamConfig(
            name=DEAD_STREAM,
            subjects=[DEAD_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.stream_replicas,
        ),
    ]


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as e:
        if e.err_code != STREAM_IN_USE:
            raise
        await js.update_stream(config)


async def ensure_streams(js: JetStreamContext, settings: BusSettings) -> None:
    """Create or update LLM_JOBS, LLM_EVENTS, LLM_DEAD, the worker registry, the object store
    and the jobs API's records."""
    for config in stream_configs(settings):
        await _ensure_stream(js, config)
    await workers_bucket(js, settings)
    await models_object_store(js, settings)
    await job_records_bucket(js, settings)


async def open_kv_bucket(
    js: JetStreamContext, name: str, *, history: int, replicas: int, ttl: float | None = None
) -> KeyValue:
    """Open a KV bucket, creating it with these settings if it does not exist yet."""
    try:
        return await js.key_value(name)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(bucket=name, ttl=ttl, history=history, replicas=replicas)


async def workers_bucket(js: JetStreamContext, settings: BusSettings) -> KeyValue:
    """The registry bucket; entries expire `worker_ttl_s` after their last heartbeat."""
    return await open_kv_bucket(
        js, WORKERS_BUCKET, ttl=settings.worker_ttl_s, history=1, replicas=settings.stream_replicas
    )


async def job_records_bucket(js: JetStreamContext, settings: BusSettings) -> KeyValue:
    """Job records (owner, request); they live as long as the job can run plus its
    Deltas' retention (`BusSettings.job_records_ttl_s`)."""
    ttl = settings.job_records_ttl_s
    kv = await open_kv_bucket(
        js, JOB_RECORDS_BUCKET, ttl=ttl, history=1, replicas=settings.stream_replicas
    )
    info = await js.stream_info(f"KV_{JOB_RECORDS_BUCKET}")
    if info.config.max_age is not None and 0 < info.config.max_age < ttl:
        # A bucket made by an older version expired records before their jobs ended.
        info.config.max_age = ttl
        await js.update_stream(info.config)
    return kv


async def models_object_store(js: JetStreamContext, settings: BusSettings) -> ObjectStore:
    try:
        return await js.object_store(MODELS_OBJECT_STORE)
    except (NotFoundError, BadRequestError):
        return await js.create_object_store(
            MODELS_OBJECT_STORE, config=ObjectStoreConfig(replicas=settings.stream_replicas)
        )


def jobs_consumer_config(model: str, settings: BusSettings) -> ConsumerConfig:
    """The durable pull consumer every worker of `model` shares."""
    return ConsumerConfig(
        durable_name=consumer_name(model),
        filter_subject=jobs_subject(model),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        # One delivery more than the runs a job gets: the worker that receives it moves the
        # job to LLM_DEAD without running it, so a job that crashes workers cannot crash
        # one more, and the move waits durably in the queue for any worker to do it.
        max_deliver=settings.max_deliver + 1,
        # Workers pull only what they can admit; this is a safety cap, not the throttle.
        max_ack_pending=-1,
    )


ROUTED_CONSUMER_INACTIVE_S = 3600.0  # a gone worker's consumer is deleted after an idle hour


def routed_consumer_config(model: str, worker_id: str, settings: BusSettings) -> ConsumerConfig:
    """The durable pull consumer of one worker's routed subject (docs/routing.md).

    Its owner pulls it; any worker of the model may bind to it to move what waits too
    long to the shared queue. No delivery cap: a routed job is run only on its first
    delivery; every later one is moved, and the shared consumer counts runs from then on
    (the move carries the runs so far)."""
    return ConsumerConfig(
        durable_name=routed_consumer_name(model, worker_id),
        filter_subject=routed_jobs_subject(model, worker_id),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=-1,
        inactive_threshold=ROUTED_CONSUMER_INACTIVE_S,
    )


async def ensure_routed_consumer(
    js: JetStreamContext, model: str, worker_id: str, settings: BusSettings
) -> None:
    await js.add_consumer(JOBS_STREAM, routed_consumer_config(model, worker_id, settings))


QUEUE_FULL_HINTS = ("maximum messages", "maximum bytes", "discard new")


def is_queue_full(error: Exception) -> bool:
    """A publish to LLM_JOBS that the stream refused because a queue bound is reached."""
    text = str(getattr(error, "description", "") or error).lower()
    return any(hint in text for hint in QUEUE_FULL_HINTS)


async def ensure_jobs_consumer(js: JetStreamContext, model: str, settings: BusSettings) -> None:
    await js.add_consumer(JOBS_STREAM, jobs_consumer_config(model, settings))


async def queue_depth(js: JetStreamContext, model: str) -> int:
    """Jobs of `model` no worker has pulled: the shared queue plus every routed subject."""
    return await shared_backlog(js, model) + await routed_backlog(js, model)


async def routed_backlog(js: JetStreamContext, model: str) -> int:
    """Jobs routed to workers of `model` (prefix routing) not pulled yet."""
    try:
        info = await js.stream_info(JOBS_STREAM, subjects_filter=routed_jobs_wildcard(model))
    except NotFoundError:
        return 0
    total = 0
    for subject, count in (info.state.subjects or {}).items():
        if not count:
            continue
        worker = worker_of_routed_subject(subject)
        try:
            consumer = await js.consumer_info(JOBS_STREAM, routed_consumer_name(model, worker))
            total += int(consumer.num_pending or 0)
        except NotFoundError:
            total += int(count)  # no consumer (yet, or deleted idle): all of it waits
    return total


async def shared_backlog(js: JetStreamContext, model: str) -> int:
    """Jobs in the model's shared queue not yet delivered (its consumer's num_pending).

    Before any worker created the consumer the whole subject is backlog, so count it in
    the stream instead.
    """
    try:
        info = await js.consumer_info(JOBS_STREAM, consumer_name(model))
        return int(info.num_pending or 0)
    except NotFoundError:
        try:
            info = await js.stream_info(JOBS_STREAM, subjects_filter=jobs_subject(model))
        except NotFoundError:
            return 0
        return int((info.state.subjects or {}).get(jobs_subject(model), 0))
