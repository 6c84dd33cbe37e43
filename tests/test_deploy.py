"""Deployment artifacts, validated with the tools this machine has (no Docker engine runs here)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from echoshot_ai_server.config import Settings

VENV_BIN = Path(sys.executable).parent
UNITS = ["echoshotx-worker.service", "echoshotx-worker@.service", "echoshotx-backlog.service", "echoshotx-backlog.timer"]


@pytest.fixture
def systemd_root(tmp_path):
    """A root with the system's own units and a stand-in for the worker's python, for `verify --root`."""
    root = tmp_path / "root"
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO_ROOT / "deploy/systemd" / unit, units / unit)
    for program in ("opt/echoshotx-ai/.venv/bin/python", "usr/bin/env"):
        stand_in = root / program
        stand_in.parent.mkdir(parents=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *(f"/etc/systemd/system/{u}" for u in units)],
                          capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_pass_verify(systemd_root):
    result = verify(systemd_root, *[unit.replace("@.", "@1.") for unit in UNITS])  # the template as GPU 1's instance
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_would_catch_a_broken_unit(systemd_root):
    unit = systemd_root / "etc/systemd/system/echoshotx-worker.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
    assert "Failed to parse kill mode" in verify(systemd_root, "echoshotx-worker.service").stderr


def unit_settings(unit: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (REPO_ROOT / "deploy/systemd" / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_the_worker_unit_outlasts_the_graceful_shutdown():
    unit = unit_settings("echoshotx-worker.service")
    defaults = Settings()
    assert int(unit["TimeoutStopSec"][0]) > defaults.shutdown_grace_s + defaults.poll_wait_s + 30
    assert unit["Restart"] == ["always"] and unit["EnvironmentFile"] == ["/etc/echoshotx/worker.env"]
    assert unit["User"] == ["echoshotx"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"] and unit["PrivateTmp"] == ["yes"]
    assert unit["ExecStart"] == ["/opt/echoshotx-ai/.venv/bin/python echoshot_ai_server/main.py"]


def test_the_per_gpu_template_gives_each_gpu_its_own_worker():
    template = unit_settings("echoshotx-worker@.service")
    single = unit_settings("echoshotx-worker.service")
    # the same unit otherwise: hardening, stop timeout, settings file
    same = {key for key in single if key not in ("Description", "ExecStart", "Environment")}
    assert {key: template[key] for key in same} == {key: single[key] for key in same}
    [command] = [line.split() for line in template["ExecStart"]]
    assert command[0] == "/usr/bin/env" and command[-2:] == ["/opt/echoshotx-ai/.venv/bin/python",
                                                             "echoshot_ai_server/main.py"]
    per_gpu = dict(arg.split("=", 1) for arg in command[1:-2])
    # its GPU, its metrics port and its work folder, set after worker.env so that it cannot override them
    assert per_gpu == {"WORKER_DEVICE": "gpu", "GPU_DEVICE_INDEX": "%i", "METRICS_PORT": "920%i",
                       "WORK_DIR": "/var/lib/echoshotx/work-gpu%i"}
    for index in range(10):
        settings = Settings(**{k.lower(): v.replace("%i", str(index)) for k, v in per_gpu.items()})
        assert (settings.gpu_device_index, settings.metrics_port) == (index, 9200 + index)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(REPO_ROOT / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_are_production_grade(dockerfile):
    text = (REPO_ROOT / dockerfile).read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M)  # a pinned base
    assert text.count("\nFROM ") >= 3  # build stage, weights stages, final stage
    assert re.search(r"^USER 10001:10001$", text, re.M)  # not root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "-r requirements.txt" in text and "torch==2.14.1" in text
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in final_stage
    # only the GPU image carries a C compiler: Triton builds its kernel launchers at run time
    assert ("gcc" in final_stage) == (dockerfile == "Dockerfile.gpu")


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install ffmpeg\n")
    result = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_compose_file_matches_the_compose_schema():
    result = subprocess.run([str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(REPO_ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["worker-cpu"]["deploy"]["replicas"] == 2
    for name, index in (("worker-gpu", "0"), ("worker-gpu-1", "1")):  # one worker per GPU
        [gpu] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["device_ids"] == [index]
        assert services[name]["environment"]["WORKER_DEVICE"] == "gpu"
    local = {name for name, service in services.items() if "local" in service.get("profiles", [])}
    assert local == {"s3-sqs", "spring-stub", "local-setup", "worker-local"}
    for name in ("worker-cpu", "worker-gpu", "worker-gpu-1", "worker-local"):
        assert services[name]["stop_grace_period"] == "3m"
    assert services["worker-local"]["environment"]["AWS_ENDPOINT_URL"] == "http://s3-sqs:5000"


def test_local_setup_creates_the_bucket_queues_and_a_sample_job(moto_server, tmp_path):
    moto_server.reset()
    env = {"PATH": "/usr/bin:/bin", **moto_server.env("ap-northeast-2")}
    result = subprocess.run([sys.executable, "-m", "echoshot_ai_server.dev.local", "local-setup", "--bucket", "videos",
                             "--queue", "upscale-cpu-queue", "--sample-job"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    s3, sqs = moto_server.client("s3", "ap-northeast-2"), moto_server.client("sqs", "ap-northeast-2")
    assert s3.head_object(Bucket="videos", Key="uploads/demo-user/sample.mp4")["ContentLength"] > 1000
    queue = sqs.get_queue_url(QueueName="upscale-cpu-queue")["QueueUrl"]
    [message] = sqs.receive_message(QueueUrl=queue)["Messages"]
    assert '"jobId": "local-sample"' in message["Body"]
    assert "RedrivePolicy" in sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]


def test_the_autoscaling_policies_apply(moto_server):
    sys.path.insert(0, str(REPO_ROOT / "deploy" / "autoscaling"))
    from apply_policies import apply

    moto_server.reset()
    autoscaling, cloudwatch = moto_server.client("autoscaling", "ap-northeast-2"), moto_server.client("cloudwatch", "ap-northeast-2")
    image = moto_server.client("ec2", "ap-northeast-2").describe_images()["Images"][0]["ImageId"]
    autoscaling.create_launch_configuration(LaunchConfigurationName="lc", ImageId=image, InstanceType="t3.xlarge")
    for group in ("echoshotx-cpu-workers", "echoshotx-gpu-workers"):
        autoscaling.create_auto_scaling_group(AutoScalingGroupName=group, LaunchConfigurationName="lc", MinSize=0,
                                              MaxSize=10, DesiredCapacity=0, AvailabilityZones=["ap-northeast-2a"])

    arns = apply(autoscaling, cloudwatch)

    policies = {p["PolicyName"]: p for p in autoscaling.describe_policies()["ScalingPolicies"]}
    tracking = policies["echoshotx-backlog-per-worker"]["TargetTrackingConfiguration"]
    assert tracking["CustomizedMetricSpecification"]["MetricName"] == "BacklogPerWorker"
    alarms = {a["AlarmName"]: a for a in cloudwatch.describe_alarms()["MetricAlarms"]}
    assert alarms["echoshotx-gpu-jobs-waiting"]["AlarmActions"] == [arns["SCALE_OUT_POLICY_ARN"]]
    assert alarms["echoshotx-gpu-idle-5-minutes"]["EvaluationPeriods"] == 5


def test_the_lifecycle_rules_apply_and_match_what_the_worker_tags(moto_server):
    from echoshot_ai_server.app.segments import SEGMENT_TAG
    from echoshot_ai_server.dev.local import create_bucket

    moto_server.reset()
    s3 = moto_server.client("s3", "ap-northeast-2")
    create_bucket(s3, "lifecycle-bucket", "ap-northeast-2")
    rules = json.loads((REPO_ROOT / "deploy/s3-lifecycle.json").read_text())
    s3.put_bucket_lifecycle_configuration(Bucket="lifecycle-bucket", LifecycleConfiguration=rules)
    applied = s3.get_bucket_lifecycle_configuration(Bucket="lifecycle-bucket")["Rules"]
    assert {rule["ID"] for rule in applied} == {"job-records", "long-job-segments", "cancel-requests"}
    from echoshot_ai_server.app.cancel import CANCEL_PREFIX

    [cancels] = [rule for rule in applied if rule["ID"] == "cancel-requests"]
    assert cancels["Filter"]["Prefix"] == CANCEL_PREFIX
    [segments] = [rule for rule in applied if rule["ID"] == "long-job-segments"]
    assert (segments["Filter"]["Tag"]["Key"], segments["Filter"]["Tag"]["Value"]) == SEGMENT_TAG
