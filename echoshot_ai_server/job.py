"""The contract with Spring: the job message we read and the callback we send (docs/job-contract.md)."""

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator,
)

from echoshot_ai_server.engine.specs import DEFAULT_MODEL, model_problem, scale_problem
from echoshot_ai_server.errors import ErrorCode, JobError, PermanentError

UPSCALE = "UPSCALE"
# Job ids become part of S3 keys and directory names: letters, digits and . _ : - only.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


def _id_to_str(value: Any) -> Any:
    # Spring's ids are often Longs: accept 123 as "123", but never floats, lists or booleans.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class JobParameters(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    device: Annotated[Literal["gpu", "cpu"], BeforeValidator(_lower)]
    scale_factor: int = Field(description="2 or 4; an integer or a numeric string")

    @field_validator("scale_factor", mode="before")
    @classmethod
    def _numeric_string(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer or a numeric string")
        return value

    model: str = Field(DEFAULT_MODEL, description="the network: RealESRGAN_x4plus, realesr-animevideov3 or RealESRGAN_x4plus_anime_6B")
    max_input_height: int | None = Field(None, alias="maxInputHeight", ge=16, le=4320, strict=True,
                                         description="taller sources are scaled down to this height before upscaling")

    @field_validator("scale_factor")
    @classmethod
    def _supported(cls, value: int) -> int:
        if (problem := scale_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if (problem := model_problem(value)) is not None:
            raise ValueError(problem)
        return value

    def work(self) -> dict:
        """What the parameters ask for, defaults left out: a job's identity does not change when a
        parameter is added with a default that keeps today's behaviour."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)


class SegmentStep(BaseModel):
    """Set only by the worker itself, on the messages of a job cut into segments (docs/job-contract.md):
    upscale segment `index` of the plan `run`, or (`assemble`) join the plan's segments."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(pattern=r"^[0-9a-f]{8,32}$")
    index: int | None = Field(None, ge=0, le=9999)
    assemble: bool = False

    @model_validator(mode="after")
    def _one_step(self) -> "SegmentStep":
        if self.assemble == (self.index is not None):
            raise ValueError("a segment step is either an index or assemble")
        return self


class JobMessage(BaseModel):
    """One SQS message body, as Spring enqueues it. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    job_id: Annotated[str, BeforeValidator(_id_to_str), Field(alias="jobId", pattern=JOB_ID_PATTERN)]
    user_id: Annotated[str | None, BeforeValidator(_id_to_str), Field(alias="userId")] = None
    task_type: str = Field(alias="taskType", description='only "UPSCALE" is handled by this worker')
    source_s3_key: str = Field(alias="sourceS3Key", min_length=1, max_length=1024)
    parameters: JobParameters
    segment: SegmentStep | None = Field(None, description="reserved: set by the worker, never by Spring")

    def body_for(self, step: SegmentStep) -> str:
        """This job's message body for one step of its segments."""
        return json.dumps({**self.model_dump(mode="json", by_alias=True, exclude={"segment"}),
                           "segment": step.model_dump(mode="json", exclude_none=True)})


def check_source_key(key: str, allowed_prefixes: list[str]) -> None:
    """Refuse keys outside the allowed prefixes, or that could be read as a path or another bucket."""
    parts = key.split("/")
    if (
        key.startswith(("/", "s3:", "arn:"))
        or "\\" in key
        or any(part in ("", ".", "..") for part in parts[:-1])
        or parts[-1] in ("", ".", "..")
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in key)
    ):
        raise PermanentError(ErrorCode.FORBIDDEN_SOURCE, f"source key {key!r} is not a plain object key")
    if not any(key.startswith(prefix) for prefix in allowed_prefixes):
        raise PermanentError(
            ErrorCode.FORBIDDEN_SOURCE, f"source key {key!r} is outside the allowed prefixes {allowed_prefixes}"
        )


def output_key(job_id: str, source_name: str) -> str:
    """Where a job's result lives in the bucket. Only the source's file stem is used, with anything
    but letters, digits, spaces and . _ - replaced, so a file name cannot move the result."""
    stem = re.sub(r"[^\w .-]", "_", Path(source_name).stem).strip(" .") or "video"
    return f"processed/upscaled/{job_id}/{stem[:100]}_upscaled.mp4"


def job_message_body(job_id: str, source_s3_key: str, *, scale: int, device: str, user_id: str | None = None,
                     **optional: Any) -> str:
    """A message body exactly as Spring enqueues it; `optional` parameters (`model`, `maxInputHeight`)
    are sent when not None."""
    parameters = {"device": device, "scale_factor": scale} | {k: v for k, v in optional.items() if v is not None}
    return json.dumps({
        "jobId": job_id,
        "userId": user_id,
        "taskType": UPSCALE,
        "sourceS3Key": source_s3_key,
        "parameters": parameters,
    })


def reportable_job_id(value: Any) -> str | None:
    """`value` as a job id that can be reported to Spring, or None. Wider than the contract's
    pattern (so that a message that breaks the contract in another way can still be reported), but
    never something that could change the callback URL's path or forge a log line: 1-128
    printable characters without whitespace, slashes or backslashes, and not `.` or `..`."""
    value = _id_to_str(value)
    if not isinstance(value, str) or not 0 < len(value) <= 128 or value in (".", ".."):
        return None
    if not value.isprintable() or re.search(r"[\s/\\]", value):
        return None
    return value


def _load(body: str) -> Any:
    """json.loads that treats nesting too deep to parse as what it is: not a usable message."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_job_id(body: str) -> str | None:
    """The jobId of a message, if one can be read at all (to report a message that is otherwise invalid)."""
    try:
        data = _load(body)
    except (TypeError, ValueError):
        return None
    return reportable_job_id(data.get("jobId")) if isinstance(data, dict) else None


def parse_job(body: str) -> JobMessage:
    """The validated job, or a PermanentError saying what is wrong with the message."""
    try:
        data = _load(body)
    except (TypeError, ValueError) as exc:
        raise PermanentError(ErrorCode.INVALID_MESSAGE, f"message body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise PermanentError(ErrorCode.INVALID_MESSAGE, "message body is not a JSON object")
    if "taskType" in data and data["taskType"] != UPSCALE:
        raise PermanentError(ErrorCode.UNSUPPORTED_TASK, f"unknown taskType {data['taskType']!r}; this worker handles UPSCALE")
    try:
        return JobMessage.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in errors)
        only_parameters = all(err["loc"][:1] == ("parameters",) and len(err["loc"]) > 1 for err in errors)
        code = ErrorCode.INVALID_PARAMETERS if only_parameters else ErrorCode.INVALID_MESSAGE
        raise PermanentError(code, f"message does not match the job contract: {problems}") from None


# An absolute path of two or more parts (the worker's files, ffmpeg's messages about them).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\":]+/)+([^\s/'\":]*)")


def without_paths(text: str) -> str:
    """`text` with absolute file paths cut down to their last part: Spring and its users learn what
    failed, not how the worker's disk is laid out."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<dir>", text)


class JobStatus(str, Enum):
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class ResultMetadata(BaseModel):
    """The result's facts: in the COMPLETED callback, the job's record and the result's S3 metadata."""

    width: int
    height: int
    fps: float
    frame_count: int
    duration: float
    # Set when the source was pre-resized (parameters.maxInputHeight or PRE_RESIZE_MAX_HEIGHT): its size as shown
    source_width: int | None = None
    source_height: int | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        return {name: value for name, value in handler(self).items() if value is not None}

    def as_s3_metadata(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.model_dump().items()}


class Usage(BaseModel):
    """What a completed job counts against the subscription's monthly minutes (COMPLETED only)."""

    model_config = ConfigDict(populate_by_name=True)

    billed_seconds: float = Field(alias="billedSeconds", description="the source video's duration")
    compute_seconds: float = Field(alias="computeSeconds", description="worker time spent: download to upload, "
                                   "every segment and the assembly of a job in segments")


class CallbackPayload(BaseModel):
    """What the worker POSTs to SPRING_CALLBACK_URL."""

    model_config = ConfigDict(populate_by_name=True)

    job_id: str = Field(alias="jobId")
    status: JobStatus
    output_s3_key: str | None = Field(None, alias="outputS3Key")
    metadata: ResultMetadata | None = None
    error_code: str | None = Field(None, alias="errorCode")
    error_message: str | None = Field(None, alias="errorMessage")
    progress: float | None = Field(None, description="percent of frames done, PROCESSING only")
    eta_seconds: float | None = Field(None, alias="etaSeconds", description="PROCESSING only")
    usage: Usage | None = Field(None, description="COMPLETED only")

    @classmethod
    def failed(cls, job_id: str, error: JobError) -> "CallbackPayload":
        return cls(job_id=job_id, status=JobStatus.FAILED, error_code=error.code.value,
                   error_message=without_paths(error.message))

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

