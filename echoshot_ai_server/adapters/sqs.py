"""SQS: where jobs come from. SQS also keeps the retry state (receive count, redrive to the DLQ)."""

import json
import logging
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
