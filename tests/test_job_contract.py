"""The published contract (docs/schemas) and the worker's parser agree."""

import json

import jsonschema
import pytest

from conftest import REPO_ROOT
from echoshot_ai_server.errors import ErrorCode, PermanentError, RetryableError
from echoshot_ai_server.job import CallbackPayload, JobStatus, ResultMetadata, job_message_body, parse_job, read_job_id

SCHEMAS = REPO_ROOT / "docs" / "schemas"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def message(**changes) -> dict:
    body = {"jobId": "job-1", "userId": 123, "taskType": "UPSCALE", "sourceS3Key": "uploads/user123/video.mp4",
            "parameters": {"device": "gpu", "scale_factor": 4}}
    for path, value in changes.items():
        target, *rest = path.split("__")
        if rest:
            body[target][rest[0]] = value
        elif value is None:
            body.pop(target)
        else:
            body[target] = value
    return body


VALID = {
    "the guide's example": message(),
    "numeric string scale": message(parameters__scale_factor="2"),
    "integer job id": message(jobId=98765),
    "upper-case device": message(parameters__device="CPU"),
    "unknown extra fields": {**message(), "priority": 1, "createdAt": "2026-01-01"},
    "no user id": message(userId=None),
    "a segment's step (the worker's own)": message(segment={"run": "abcdef12", "index": 3}),
    "an assembly step (the worker's own)": message(segment={"run": "abcdef12", "assemble": True}),
    "the fast video model": message(parameters__model="realesr-animevideov3"),
    "the anime model": message(parameters__model="RealESRGAN_x4plus_anime_6B"),
    "the guide's model named": message(parameters__model="RealESRGAN_x4plus"),
    "a pre-resize to 720p": message(parameters__maxInputHeight=720),
}
INVALID = {
    "scale 3": (message(parameters__scale_factor=3), ErrorCode.INVALID_PARAMETERS),
    "scale as words": (message(parameters__scale_factor="four"), ErrorCode.INVALID_PARAMETERS),
    "fractional scale": (message(parameters__scale_factor=2.5), ErrorCode.INVALID_PARAMETERS),
    "device tpu": (message(parameters__device="tpu"), ErrorCode.INVALID_PARAMETERS),
    "unknown model": (message(parameters__model="RealESRGAN_x2plus"), ErrorCode.INVALID_PARAMETERS),
    "model not a string": (message(parameters__model=4), ErrorCode.INVALID_PARAMETERS),
    "pre-resize too small": (message(parameters__maxInputHeight=8), ErrorCode.INVALID_PARAMETERS),
    "pre-resize as a string": (message(parameters__maxInputHeight="720"), ErrorCode.INVALID_PARAMETERS),
    "pre-resize fractional": (message(parameters__maxInputHeight=720.5), ErrorCode.INVALID_PARAMETERS),
    "no source": (message(sourceS3Key=None), ErrorCode.INVALID_MESSAGE),
    "empty job id": (message(jobId=""), ErrorCode.INVALID_MESSAGE),
    "no parameters": (message(parameters=None), ErrorCode.INVALID_MESSAGE),
    "other task": (message(taskType="TRANSCODE"), ErrorCode.UNSUPPORTED_TASK),
    "segment without a step": (message(segment={"run": "abcdef12"}), ErrorCode.INVALID_MESSAGE),
    "segment with two steps": (message(segment={"run": "abcdef12", "index": 1, "assemble": True}),
                               ErrorCode.INVALID_MESSAGE),
    "segment with a bad run": (message(segment={"run": "../x", "index": 1}), ErrorCode.INVALID_MESSAGE),
    "segment with a negative index": (message(segment={"run": "abcdef12", "index": -1}), ErrorCode.INVALID_MESSAGE),
    "segment with extra fields": (message(segment={"run": "abcdef12", "index": 1, "x": 1}), ErrorCode.INVALID_MESSAGE),
}


@pytest.mark.parametrize("body", VALID.values(), ids=VALID.keys())
def test_valid_messages_pass_the_schema_and_the_parser(body):
    jsonschema.validate(body, schema("job-message.schema.json"))
    job = parse_job(json.dumps(body))
    assert job.job_id == str(body["jobId"]) and job.parameters.scale_factor in (2, 4)
    assert job.parameters.device in ("gpu", "cpu")


@pytest.mark.parametrize("body, code", INVALID.values(), ids=INVALID.keys())
def test_invalid_messages_fail_the_schema_and_the_parser(body, code):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, schema("job-message.schema.json"))
    with pytest.raises(PermanentError) as err:
        parse_job(json.dumps(body))
    assert err.value.code == code


@pytest.mark.parametrize("body", ["", "not json", "[1, 2]", "null", '"job"'])
def test_bodies_that_are_not_json_objects(body):
    with pytest.raises(PermanentError) as err:
        parse_job(body)
    assert err.value.code == ErrorCode.INVALID_MESSAGE
    assert read_job_id(body) is None


def test_job_id_is_read_even_from_an_invalid_message():
    assert read_job_id(json.dumps(message(parameters__scale_factor=3))) == "job-1"
    assert read_job_id(json.dumps(message(jobId=7, sourceS3Key=None))) == "7"


def test_enqueue_writes_what_the_schema_describes():
    body = json.loads(job_message_body("j", "uploads/a.mp4", scale=2, device="cpu", user_id="5"))
    jsonschema.validate(body, schema("job-message.schema.json"))


@pytest.mark.parametrize("payload", [
    CallbackPayload(job_id="j", status=JobStatus.PROCESSING, progress=42.5, eta_seconds=12.0),
    CallbackPayload(job_id="j", status=JobStatus.COMPLETED, output_s3_key="processed/upscaled/j/a_upscaled.mp4",
                    metadata=ResultMetadata(width=1280, height=960, fps=30.0, frame_count=150, duration=5.0)),
    CallbackPayload.failed("j", PermanentError(ErrorCode.INVALID_VIDEO, "not a video")),
    CallbackPayload.failed("j", RetryableError(ErrorCode.STORAGE_UNAVAILABLE, "S3 down")),
], ids=["processing", "completed", "failed-permanent", "failed-retryable"])
def test_callbacks_match_their_schema(payload):
    jsonschema.validate(payload.to_json(), schema("callback.schema.json"))
