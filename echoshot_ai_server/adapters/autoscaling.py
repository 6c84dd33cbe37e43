"""AWS Auto Scaling and CloudWatch: the backlog figure to scale on, and scale-in protection."""

import logging

import requests

from echoshot_ai_server.adapters import aws
from echoshot_ai_server.errors import ErrorCode

log = logging.getLogger(__name__)
NAMESPACE = "EchoShotX"
IMDS = "http://169.254.169.254/latest"


def backlog_per_worker(visible_messages: int, workers: int) -> float:
    """Jobs waiting per running worker. With no worker at all, every waiting job counts in full,
    so that a group scaled to zero (the guide's GPU minimum) starts as soon as a job arrives."""
    return float(visible_messages) / workers if workers > 0 else float(visible_messages)


class AutoScaling:
    def __init__(self, *, region: str, endpoint_url: str | None = None):
        self._asg = aws.client("autoscaling", region=region, endpoint_url=endpoint_url)
        self._cloudwatch = aws.client("cloudwatch", region=region, endpoint_url=endpoint_url)

    def in_service(self, group: str) -> int:
        with aws.translated(f"describe group {group}", ErrorCode.SCALING_UNAVAILABLE):
            groups = self._asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        return sum(1 for g in groups for i in g["Instances"] if i["LifecycleState"] == "InService")

    def publish_backlog(self, queue_name: str, visible: int, workers: int) -> float:
        value = backlog_per_worker(visible, workers)
        dimensions = [{"Name": "QueueName", "Value": queue_name}]
        with aws.translated("CloudWatch put_metric_data", ErrorCode.SCALING_UNAVAILABLE):
            self._cloudwatch.put_metric_data(Namespace=NAMESPACE, MetricData=[
                {"MetricName": "BacklogPerWorker", "Dimensions": dimensions, "Value": value, "Unit": "Count"},
                {"MetricName": "VisibleMessages", "Dimensions": dimensions, "Value": visible, "Unit": "Count"},
                {"MetricName": "RunningWorkers", "Dimensions": dimensions, "Value": workers, "Unit": "Count"},
            ])
        return value

    def protect(self, group: str, instance_id: str, protected: bool) -> None:
        with aws.translated(f"set instance protection of {instance_id}", ErrorCode.SCALING_UNAVAILABLE):
            self._asg.set_instance_protection(AutoScalingGroupName=group, InstanceIds=[instance_id],
                                              ProtectedFromScaleIn=protected)


def ec2_instance_id(timeout_s: float = 2) -> str:
    """This machine's EC2 instance id, from the instance metadata service (IMDSv2)."""
    token = requests.put(f"{IMDS}/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
                         timeout=timeout_s).text
    return requests.get(f"{IMDS}/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token},
                        timeout=timeout_s).text.strip()
