"""Operators' commands: replay the dead-letter queue, publish the autoscaling backlog."""

import logging

from echoshot_ai_server.job import read_job_id
from echoshot_ai_server.adapters.sqs import JobQueue
from echoshot_ai_server.adapters.autoscaling import AutoScaling

log = logging.getLogger(__name__)


def replay_dead_letters(dead_letters: JobQueue, target: JobQueue, *, limit: int | None = None,
                        list_only: bool = False) -> list[str]:
    """Move messages from the dead-letter queue back to the job queue (new messages: their receive
    count starts again). With `list_only`, show them and leave them where they are."""
    seen, held = [], []
    while limit is None or len(seen) < limit:
        want = 10 if limit is None else min(10, limit - len(seen))
        # Held invisible for the length of the run, so that no message is read twice.
        messages = dead_letters.receive(want, wait_s=1, visibility_timeout_s=300)
        if not messages:
            break
        for message in messages:
            job_id = read_job_id(message.body) or f"message:{message.message_id}"
            seen.append(job_id)
            if list_only:
                held.append(message)
                continue
            # One deduplication id per dead letter: two copies of a job are two replays (the job's
            # record keeps it from being done twice), and a replay repeated after a crash is one.
            target.send(message.body, group_id=job_id, dedup_id=f"replay-{message.message_id}")
            dead_letters.delete(message)
            log.info("replayed %s", job_id)
    for message in held:
        dead_letters.release(message)
    return seen


def publish_backlog(job_queue: JobQueue, autoscaling: AutoScaling, *, workers: int | None = None,
                    group: str | None = None) -> dict:
    """Publish BacklogPerWorker (visible messages / running workers) for target-tracking scaling."""
    visible = job_queue.visible_count()
    running = workers if workers is not None else autoscaling.in_service(group)
    value = autoscaling.publish_backlog(job_queue.name, visible, running)
    return {"queue": job_queue.name, "visible": visible, "workers": running, "backlog_per_worker": value}
