"""Who works on a job, and whether it is done: one small JSON record per job in S3.

SQS delivers a message at least once, and Spring may send one job twice. So that a job is computed,
uploaded and reported COMPLETED once however many messages carry it, each attempt first claims the
job's record (`processed/jobs/{jobId}.json`) with a conditional write: `If-None-Match: *` when
there is none, `If-Match: <ETag>` to take one over. Of two workers that race, exactly one write
succeeds. A record names its owner (the SQS message id of the attempt) and is held until
`expiresAt`; the owner renews it while it works, like the message's visibility. The same message
delivered again may always take its own record back (the worker that had it died, or the attempt
was retried); another message may take it only once it has expired.

A record also holds what the job asked for (a fingerprint of the source key and the parameters), so that a job id reused for other work is done again instead of answered with the old
result, and, once done, where its result is and whether Spring has acknowledged COMPLETED.
"""

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Literal, Protocol

log = logging.getLogger(__name__)

RECORD_PREFIX = "processed/jobs/"
State = Literal["running", "segmented", "completed", "failed", "cancelled"]


def record_key(job_id: str) -> str:
    return f"{RECORD_PREFIX}{job_id}.json"


def fingerprint(source_key: str, parameters: dict) -> str:
    """What makes two messages with one job id the same work: the source and the parameters."""
    text = json.dumps({"source": source_key, "parameters": parameters}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class JobRecord:
    fingerprint: str
    state: State
    owner: str
    expires_at: float
    output_key: str | None = None
    metadata: dict | None = None
    reported: bool = False  # Spring acknowledged the final callback
    plan: dict | None = None  # a job cut into segments: how (app/segments.py)
    usage: dict | None = None  # what the job is billed: {"billedSeconds", "computeSeconds"} (job.py's Usage)

    @classmethod
    def from_json(cls, data: dict) -> "JobRecord | None":
        try:
            record = cls(**data)
        except TypeError:
            return None
        if record.state not in ("running", "segmented", "completed", "failed", "cancelled") or not isinstance(record.expires_at, (int, float)):
            return None
        return record


class Decision(str, Enum):
    WORK = "work"  # claimed: compute the job
    REPORT = "report"  # claimed: the result exists, Spring has not acknowledged it yet
    DUPLICATE = "duplicate"  # done and reported, or being done by another message: drop this one
    BUSY = "busy"  # another message does other work under this job id: try again later
    SEGMENTED = "segmented"  # this message cut the job into segments: their messages may not all be sent


@dataclass
class Claim:
    """An attempt's hold on a job's record. Written by the job and by the heartbeat (renewals), so
    writes take turns; once settled (reported, or let go), renewals stop."""

    name: str  # the job id; a segment's record: "{jobId}/{run}/{index}"
    record: JobRecord
    etag: str
    settled: bool = False
    tags: dict[str, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def key(self) -> str:
        return record_key(self.name)


class LostClaim(Exception):
    """The record was taken over by another attempt (ours had expired)."""


class JsonStore(Protocol):
    """What the records need of S3 (adapters/s3.py): small JSON objects and conditional writes."""

    def read_json(self, key: str) -> tuple[dict, str] | None: ...
    def put_json(self, key: str, data: dict, *, if_match: str | None = None, if_absent: bool = False,
                 tags: dict[str, str] | None = None) -> str | None: ...


class JobRecords:
    def __init__(self, storage: JsonStore, *, lease_s: float):
        self.storage = storage
        self.lease_s = lease_s

    def read(self, name: str) -> tuple[JobRecord, str] | None:
        found = self.storage.read_json(record_key(name))
        record = JobRecord.from_json(found[0]) if found else None
        return (record, found[1]) if record else None

    def claim(self, name: str, wanted: str, owner: str, *, run: str | None = None,
              tags: dict[str, str] | None = None) -> tuple[Decision, Claim | None]:
        """Decide what this attempt does with the job (or segment), taking its record when it is to
        work on it. `run`: claim a job cut into segments by that plan, to join them."""
        for _ in range(5):  # each round loses at most one race to another attempt
            found = self.storage.read_json(record_key(name))
            current = JobRecord.from_json(found[0]) if found else None
            decision = _decide(current, wanted, owner) if run is None else _decide_assembly(current, wanted, owner, run)
            if decision in (Decision.DUPLICATE, Decision.BUSY):
                log.info("job record: %s (%s)", decision.value, f"{current.state} by {current.owner}" if current else "none")
                return decision, None
            if decision is Decision.SEGMENTED:
                return decision, Claim(name, current, found[1], settled=True)
            if decision is Decision.REPORT or run is not None:
                record = replace(current, owner=owner, expires_at=time.time() + self.lease_s)
            else:
                record = JobRecord(wanted, "running", owner, time.time() + self.lease_s)
            etag = self.storage.put_json(record_key(name), asdict(record), if_match=found[1] if found else None,
                                         if_absent=not found, tags=tags)
            if etag is not None:
                return decision, Claim(name, record, etag, tags=tags)
        raise RuntimeError(f"could not claim the record {name}: it keeps changing")

    def renew(self, claim: Claim) -> None:
        self._write(claim, lambda record: replace(record, expires_at=time.time() + self.lease_s))

    def completed(self, claim: Claim, output_key: str, metadata: dict, usage: dict | None = None) -> None:
        self._write(claim, lambda record: replace(record, state="completed", output_key=output_key, metadata=metadata,
                                                  usage=usage, expires_at=time.time() + self.lease_s))

    def segmented(self, claim: Claim, plan: dict) -> None:
        """The job is cut into segments, each with a message of its own: nobody holds the job now."""
        self._write(claim, lambda record: replace(record, state="segmented", plan=plan, expires_at=0), settle=True)

    def fail_segmented(self, job_id: str, run: str) -> bool:
        """Mark a job cut into segments by `run` failed. False when it is no longer in progress under
        that plan (it failed already, or was planned again): only one segment reports the failure."""
        for _ in range(5):
            found = self.read(job_id)
            if found is None or found[0].state != "segmented" or (found[0].plan or {}).get("run") != run:
                return False
            if self.storage.put_json(record_key(job_id), asdict(replace(found[0], state="failed", expires_at=0)),
                                     if_match=found[1]) is not None:
                return True
        raise RuntimeError(f"could not mark job {job_id} failed: its record keeps changing")

    def cancel(self, job_id: str, owner: str) -> tuple[Literal["send", "drop", "too late"], dict | None]:
        """Mark the job cancelled by request, and say what this attempt does. "send": this attempt
        (message `owner`) marked it, or marked it before and has not had the CANCELLED callback
        acknowledged: it sends the callback; "drop": another attempt did; "too late": the job had
        ended (completed or failed) already. With it, the plan of a job cut into segments (or None)."""
        for _ in range(5):
            found = self.storage.read_json(record_key(job_id))
            current = JobRecord.from_json(found[0]) if found else None
            plan = current.plan if current else None
            if current is not None and current.state in ("completed", "failed"):
                return "too late", plan
            if current is not None and current.state == "cancelled":
                return ("send" if current.owner == owner and not current.reported else "drop"), plan
            record = (JobRecord("", "cancelled", owner, 0) if current is None
                      else replace(current, state="cancelled", owner=owner, expires_at=0))
            if self.storage.put_json(record_key(job_id), asdict(record), if_match=found[1] if found else None,
                                     if_absent=not found) is not None:
                return "send", plan
        raise RuntimeError(f"could not mark job {job_id} cancelled: its record keeps changing")

    def cancel_reported(self, job_id: str) -> None:
        """Spring acknowledged CANCELLED (best effort: at worst it is sent once more)."""
        found = self.storage.read_json(record_key(job_id))
        current = JobRecord.from_json(found[0]) if found else None
        if current is not None and current.state == "cancelled":
            self.storage.put_json(record_key(job_id), asdict(replace(current, reported=True)), if_match=found[1])

    def reported(self, claim: Claim) -> None:
        """Spring acknowledged the final callback: the record is settled, and free for a new attempt
        (which, for a completed job, will find nothing to do)."""
        self._write(claim, lambda record: replace(record, reported=True, expires_at=0), settle=True)

    def let_go(self, claim: Claim) -> None:
        """The attempt failed for good (or gave up): a later message with this job id, such as a
        replay from the dead-letter queue, may take the job at once."""
        failed = ("running", "segmented")
        self._write(claim, lambda record: replace(record, state="failed" if record.state in failed else record.state,
                                                  expires_at=0), settle=True)

    def _write(self, claim: Claim, change, settle: bool = False) -> None:
        with claim.lock:
            if claim.settled:
                return
            record = change(claim.record)
            etag = self.storage.put_json(claim.key, asdict(record), if_match=claim.etag, tags=claim.tags)
            if etag is None:
                raise LostClaim(f"the record {claim.name} was taken over by another attempt")
            claim.record, claim.etag, claim.settled = record, etag, settle


def _decide(current: JobRecord | None, wanted: str, owner: str) -> Decision:
    if current is None:
        return Decision.WORK
    if current.state == "cancelled":  # for good: a message of a cancelled job is never worked on
        return Decision.DUPLICATE
    same_work = current.fingerprint == wanted
    held_by_another = current.owner != owner and current.expires_at > time.time()
    if held_by_another:
        return Decision.DUPLICATE if same_work else Decision.BUSY
    if current.state == "segmented":  # its segments are in progress under their own messages
        if not same_work:
            return Decision.BUSY
        return Decision.SEGMENTED if current.owner == owner else Decision.DUPLICATE
    if same_work and current.state == "completed":
        return Decision.DUPLICATE if current.reported else Decision.REPORT
    return Decision.WORK


def _decide_assembly(current: JobRecord | None, wanted: str, owner: str, run: str) -> Decision:
    """Joining the segments of plan `run`: only while the job is in progress (or done) under that plan."""
    if current is None or current.fingerprint != wanted or (current.plan or {}).get("run") != run:
        return Decision.DUPLICATE
    if current.owner != owner and current.expires_at > time.time():
        return Decision.DUPLICATE
    if current.state == "completed":
        return Decision.DUPLICATE if current.reported else Decision.REPORT
    return Decision.WORK if current.state == "segmented" else Decision.DUPLICATE
