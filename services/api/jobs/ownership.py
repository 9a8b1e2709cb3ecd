"""Jobs belong to the API key that submitted them.

Every job route (`GET`/`DELETE /v1/jobs/{id}`, `/events`) and every re-attach
(`Last-Event-ID`, `?after=`) loads the job's record and compares its owner with the
caller's key. A stranger gets exactly the 404 of a job that does not exist, so job ids
cannot be probed; a key with the operator scope sees every job. With auth off every
caller is the same anonymous tenant and sees every job, as before.
"""

from __future__ import annotations

from nats.js.kv import KeyValue

from services.api.errors import APIError, echo
from services.api.gateway.admission import Caller
from services.api.jobs.records import JobRecord, get_record


def job_not_found(job_id: str) -> APIError:
    return APIError(
        404, f"No job with id '{echo(job_id)}' (or it has expired).", "id", "job_not_found"
    )


def may_access(record: JobRecord, caller: Caller) -> bool:
    if caller.key is not None and caller.key.operator:
        return True
    return record.owner == caller.key_id


async def owned_record(kv: KeyValue, job_id: str, caller: Caller) -> JobRecord:
    """The job's record if `caller` may see it; the same 404 for missing and foreign."""
    record = await get_record(kv, job_id)
    if record is None or not may_access(record, caller):
        raise job_not_found(job_id)
    return record
