"""Apply the scaling policies and alarms in this folder to the two Auto Scaling groups.

    AWS_REGION=ap-northeast-2 python deploy/autoscaling/apply_policies.py

The JSON files are boto3 request bodies (also usable with `aws ... --cli-input-json`); the alarms'
`*_POLICY_ARN` placeholders are replaced by the policies' ARNs. Group and queue names are the
files' defaults: edit them there.
"""

import json
import sys
from pathlib import Path

import boto3

HERE = Path(__file__).resolve().parent


def load(name: str) -> dict:
    return json.loads((HERE / name).read_text())


def put_policy(autoscaling, name: str) -> str:
    policy = load(name)
    autoscaling.put_scaling_policy(**policy)
    [described] = autoscaling.describe_policies(AutoScalingGroupName=policy["AutoScalingGroupName"],
                                                PolicyNames=[policy["PolicyName"]])["ScalingPolicies"]
    return described["PolicyARN"]


def apply(autoscaling, cloudwatch) -> dict[str, str]:
    arns = {
        "cpu": put_policy(autoscaling, "cpu-workers-scaling-policy.json"),
        "SCALE_OUT_POLICY_ARN": put_policy(autoscaling, "gpu-workers-scale-out-policy.json"),
        "SCALE_IN_POLICY_ARN": put_policy(autoscaling, "gpu-workers-scale-in-policy.json"),
    }
    for name in ("gpu-workers-scale-out-alarm.json", "gpu-workers-idle-alarm.json"):
        alarm = load(name)
        alarm["AlarmActions"] = [arns[action] for action in alarm["AlarmActions"]]
        cloudwatch.put_metric_alarm(**alarm)
    return arns


if __name__ == "__main__":
    for purpose, arn in apply(boto3.client("autoscaling"), boto3.client("cloudwatch")).items():
        print(f"{purpose}: {arn}")
    sys.exit(0)
