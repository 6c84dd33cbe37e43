"""SQS: where jobs come from. SQS also keeps the retry state (receive count, redrive to the DLQ)."""

import json
import logging
import time
from dataclasses import dataclass

from echoshot_ai_server.adapters import aws
from echoshot_ai_server.errors import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueMessage:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at_ms: int | None
    queue_url: str = ""  # the queue it came from: where it is settled


class JobQueue:
    def __init__(self, queue_url: str, *, region: str, endpoint_url: str | None = None, **timeouts: float):
        self.url = queue_url
        self.is_fifo = queue_url.endswith(".fifo")
        self._sqs = aws.client("sqs", region=region, endpoint_url=endpoint_url, **timeouts)

    def _call(self, what: str, **kwargs):
        with aws.translated(f"SQS {what}", ErrorCode.QUEUE_UNAVAILABLE):
            return getattr(self._sqs, what)(QueueUrl=self.url, **kwargs)

    def receive(self, max_messages: int, *, wait_s: int, visibility_timeout_s: int) -> list[QueueMessage]:
        response = self._call(
            "receive_message",
            MaxNumberOfMessages=max(1, min(max_messages, 10)),
            WaitTimeSeconds=wait_s,
            VisibilityTimeout=visibility_timeout_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        return [
            QueueMessage(
                message_id=m["MessageId"],
                receipt_handle=m["ReceiptHandle"],
                body=m.get("Body", ""),
                receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                sent_at_ms=int(m["Attributes"]["SentTimestamp"]) if "SentTimestamp" in m.get("Attributes", {}) else None,
                queue_url=self.url,
            )
            for m in response.get("Messages", [])
        ]

    def delete(self, message: QueueMessage) -> None:
        self._call("delete_message", ReceiptHandle=message.receipt_handle)

    def extend_visibility(self, message: QueueMessage, timeout_s: int) -> None:
        self._call("change_message_visibility", ReceiptHandle=message.receipt_handle, VisibilityTimeout=timeout_s)

    def release(self, message: QueueMessage, delay_s: int = 0) -> None:
        """Make the message visible again after `delay_s` seconds (0: at once)."""
        self.extend_visibility(message, delay_s)

    def of(self, message: QueueMessage) -> "JobQueue":
        """The queue a message is settled on: this one."""
        return self

    def send(self, body: str, *, group_id: str, dedup_id: str) -> str:
        extra = {"MessageGroupId": group_id, "MessageDeduplicationId": dedup_id} if self.is_fifo else {}
        return self._call("send_message", MessageBody=body, **extra)["MessageId"]

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def visible_count(self) -> int:
        attributes = self._call("get_queue_attributes", AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"])

    def dead_letter_queue_url(self) -> str | None:
        """The URL of the queue the redrive policy sends failed messages to."""
        attributes = self._call("get_queue_attributes", AttributeNames=["RedrivePolicy"]).get("Attributes", {})
        if "RedrivePolicy" not in attributes:
            return None
        arn = json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
        account, name = arn.split(":")[4:6]
        with aws.translated(f"SQS get_queue_url {name}", ErrorCode.QUEUE_UNAVAILABLE):
            return self._sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]

    def max_receive_count(self) -> int | None:
        """maxReceiveCount of the queue's redrive policy, or None when it has no dead-letter queue."""
        attributes = self._call("get_queue_attributes", AttributeNames=["RedrivePolicy"]).get("Attributes", {})
        if "RedrivePolicy" not in attributes:
            return None
        return int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"])


class PriorityQueues:
    """The queues a worker serves, highest priority first. A lower queue is read only when the ones
    above it are empty, except that a queue left unread for `starvation_s` is read first; when all
    are empty, the worker waits for new work on the highest. Each message is settled (deleted,
    released, kept invisible) on the queue it came from."""

    def __init__(self, queues: list[JobQueue], *, starvation_s: float = 300):
        self.queues = queues
        self.starvation_s = starvation_s
        self._by_url = {queue.url: queue for queue in queues}
        self._last_read = {queue.url: time.monotonic() for queue in queues}

    @property
    def url(self) -> str:
        return ", ".join(queue.url for queue in self.queues)

    def of(self, message: QueueMessage) -> JobQueue:
        return self._by_url.get(message.queue_url, self.queues[0])

    def receive(self, max_messages: int, *, wait_s: int, visibility_timeout_s: int) -> list[QueueMessage]:
        if len(self.queues) == 1:
            return self.queues[0].receive(max_messages, wait_s=wait_s, visibility_timeout_s=visibility_timeout_s)
        unread_s = {q.url: time.monotonic() - self._last_read[q.url] for q in self.queues}
        starved = [q for q in self.queues[1:] if unread_s[q.url] > self.starvation_s][:1]
        for queue in starved + [q for q in self.queues if q not in starved]:
            messages = queue.receive(max_messages, wait_s=0, visibility_timeout_s=visibility_timeout_s)
            self._last_read[queue.url] = time.monotonic()
            if messages:
                if queue in starved:
                    log.info("%s not read for %.0fs: served before the queues above it", queue.name, unread_s[queue.url])
                return messages
        return self.queues[0].receive(max_messages, wait_s=wait_s, visibility_timeout_s=visibility_timeout_s)

    def delete(self, message: QueueMessage) -> None:
        self.of(message).delete(message)

    def extend_visibility(self, message: QueueMessage, timeout_s: int) -> None:
        self.of(message).extend_visibility(message, timeout_s)

    def release(self, message: QueueMessage, delay_s: int = 0) -> None:
        self.of(message).release(message, delay_s)
