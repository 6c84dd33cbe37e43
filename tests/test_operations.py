"""Operators' commands against the local S3/SQS server: DLQ replay, backlog for autoscaling, scale-in protection."""

import datetime
import json

import pytest

from conftest import REGION
from echoshot_ai_server.cli import main as echoshot
from echoshot_ai_server.job import job_message_body
from echoshot_ai_server.adapters.autoscaling import backlog_per_worker
from fault_proxy import FaultProxy, s3_get
from worker_harness import enqueue, make_worker, queue_counts, run_jobs, statuses, upload_clip


def test_failed_jobs_are_found_in_the_dead_letter_queue_and_replayed(stack, make_clip, capsys):
    # Given a job that failed on every attempt (S3 down) and went to the dead-letter queue
    enqueue(stack, upload_clip(stack, make_clip), "j-replay")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.fail(s3_get("clip.mp4"))
        worker = make_worker(stack, aws_endpoint_url=proxy.url)
        run_jobs(worker, rounds=4)
    assert queue_counts(stack) == (0, 0) and queue_counts(stack, stack.dlq_url)[0] == 1

    # When an operator lists it, it stays there
    assert echoshot(["replay-dlq", "--queue-url", stack.queue_url, "--list"]) == 0
    assert json.loads(capsys.readouterr().out)["waiting"] == ["j-replay"]
    assert queue_counts(stack, stack.dlq_url)[0] == 1

    # And when S3 is back and the operator replays it, it completes
    assert echoshot(["replay-dlq", "--queue-url", stack.queue_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"deadLetterQueueUrl": stack.dlq_url, "replayed": ["j-replay"]}
    assert queue_counts(stack, stack.dlq_url) == (0, 0)
    run_jobs(make_worker(stack))
    assert statuses(stack, "j-replay")[-1] == "COMPLETED"


def test_replay_at_most_n(stack, capsys):
    for i in range(3):
        stack.sqs.send_message(QueueUrl=stack.dlq_url, MessageBody=job_message_body(f"j{i}", "uploads/a.mp4", scale=2, device="cpu"))
    assert echoshot(["replay-dlq", "--queue-url", stack.queue_url, "--max", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["replayed"]) == 2
    assert queue_counts(stack)[0] == 2 and queue_counts(stack, stack.dlq_url)[0] == 1


@pytest.mark.parametrize("visible, workers, expected", [(10, 2, 5.0), (3, 4, 0.75), (0, 3, 0.0), (2, 0, 2.0)])
def test_backlog_per_worker(visible, workers, expected):
    assert backlog_per_worker(visible, workers) == expected


def autoscaling_group(stack, name="workers", size=2):
    asg, ec2 = stack.moto.client("autoscaling", REGION), stack.moto.client("ec2", REGION)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    asg.create_launch_configuration(LaunchConfigurationName=f"{name}-lc", ImageId=image, InstanceType="g4dn.xlarge")
    asg.create_auto_scaling_group(AutoScalingGroupName=name, LaunchConfigurationName=f"{name}-lc", MinSize=0, MaxSize=5,
                                  DesiredCapacity=size, AvailabilityZones=[f"{REGION}a"])
    return asg


def test_backlog_is_published_for_target_tracking(stack, capsys, monkeypatch):
    autoscaling_group(stack, size=2)
    for i in range(5):
        enqueue(stack, "uploads/a.mp4", f"j{i}")
    monkeypatch.setenv("AUTOSCALING_GROUP_NAME", "workers")

    assert echoshot(["publish-backlog", "--queue-url", stack.queue_url]) == 0

    figures = json.loads(capsys.readouterr().out)
    assert figures == {"queue": "upscale-cpu-queue", "visible": 5, "workers": 2, "backlog_per_worker": 2.5}
    cloudwatch = stack.moto.client("cloudwatch", REGION)
    now = datetime.datetime.now(datetime.timezone.utc)
    points = cloudwatch.get_metric_statistics(
        Namespace="EchoShotX", MetricName="BacklogPerWorker", Dimensions=[{"Name": "QueueName", "Value": "upscale-cpu-queue"}],
        StartTime=now - datetime.timedelta(minutes=5), EndTime=now + datetime.timedelta(minutes=1), Period=60,
        Statistics=["Maximum"])["Datapoints"]
    assert [p["Maximum"] for p in points] == [2.5]


def test_the_instance_is_protected_from_scale_in_while_a_job_runs(stack, make_clip):
    asg = autoscaling_group(stack, size=2)
    instance = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["workers"])["AutoScalingGroups"][0]["Instances"][0]
    protected_during_job = []

    worker = make_worker(stack, protect_instance_while_busy=True, autoscaling_group_name="workers",
                         ec2_instance_id=instance["InstanceId"])

    def protection():
        group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["workers"])["AutoScalingGroups"][0]
        return next(i["ProtectedFromScaleIn"] for i in group["Instances"] if i["InstanceId"] == instance["InstanceId"])

    original = worker.task.run

    def run_and_look(*args):
        protected_during_job.append(protection())
        return original(*args)

    worker.task.run = run_and_look
    enqueue(stack, upload_clip(stack, make_clip), "j-protected")
    run_jobs(worker)

    assert protected_during_job == [True]
    assert protection() is False
    assert statuses(stack, "j-protected")[-1] == "COMPLETED"
