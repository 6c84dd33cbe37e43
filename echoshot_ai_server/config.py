"""All configuration, read once from the environment (names as in the system guide)."""

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

class Settings(BaseSettings):
    """Every setting of the worker. Environment variable = field name in upper case."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    # Model
    weights_dir: Path = Path("weights")
    # The models a job may ask for, loaded at start (comma-separated; empty: every model the engine knows)
    models: Annotated[list[str], NoDecode] = []
    pre_pad: int = Field(0, ge=0)
    gpu_tile: int = Field(0, ge=0)
    gpu_tile_pad: int = Field(10, ge=0)
    gpu_tile_fallback: int = Field(128, ge=0)
    gpu_batch_frames: int = Field(4, ge=1)
    gpu_engine: Literal["auto", "fused", "compile", "eager"] = "auto"
    # RRDBNet's tail under torch.compile instead of the fused kernels' own (slower since those exist):
    # never, background or start
    gpu_tail_compile: Literal["background", "start", "never"] = "never"
    # Small batches (up to 4 frames of 320x240) of the fused engine replayed as CUDA graphs: one launch
    # instead of ~350; their shared memory pool is kept out of the memory plan
    gpu_cuda_graphs: bool = True
    gpu_memory_limit_gb: float = Field(0, ge=0)
    cpu_tile: int = Field(128, ge=0)
    cpu_tile_pad: int = Field(5, ge=0)
    cpu_tile_fallback: int = Field(64, ge=0)
    cpu_batch_frames: int = Field(1, ge=1)
    # bf16: the model in bfloat16 (about 2.3x fp32 where the CPU multiplies bf16, ≥ 50 dB against fp32);
    # auto: bf16 on such CPUs (AVX-512 BF16, AMX), else fp32, the guide's
    cpu_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Tuned, compiled GPU kernels: kept under this folder, in a subfolder per GPU, driver and library
    # versions (unset: Triton's and torch.compile's own folders)
    kernel_cache_dir: Path | None = None

    # Video tools and encoding
    ffmpeg_bin: str = "ffmpeg"
    ffprobe_bin: str = "ffprobe"
    x264_preset: str = "medium"
    x264_crf: int = Field(23, ge=0, le=51)
    audio_bitrate: str = "128k"
    ten_bit_codec: Literal["h264", "hevc"] = "h264"  # results of sources deeper than 8 bits: High 10 or Main 10
    # Videos longer than twice this are encoded as parts of this many seconds by up to 4 encoders at
    # once, then joined without encoding again (0: one encoder). For hosts where one x264 process
    # leaves cores idle; no gain on an H100 host's 16 vCPUs (docs/operations.md). Each part starts
    # with a keyframe.
    encode_part_s: float = Field(0, ge=0)

    # Input limits, sized for the guide's tiers (up to 4K sources, 10 minutes, 8K results)
    max_input_width: int = Field(4096, ge=0)
    max_input_height: int = Field(4096, ge=0)
    max_input_pixels: int = Field(3840 * 2160, ge=0)
    max_duration_s: float = Field(600, ge=0)
    max_frame_count: int = Field(36000, ge=0)
    max_output_pixels: int = Field(7680 * 4320, ge=0)
    max_download_bytes: int = Field(4 * 2**30, ge=0)
    allowed_source_prefixes: Annotated[list[str], NoDecode] = ["uploads/"]
    # A job whose estimated compute on this worker (frames x pixels x the model's cost / its speed here,
    # measured at start) is longer than this is refused with JOB_TOO_LARGE before its frames (0: never)
    max_job_seconds: float = Field(7200, ge=0)
    # Sources taller than this are scaled down to it before upscaling, aspect kept (the guide's
    # "pre-resize to 720p"); a job's parameters.maxInputHeight may ask for less (0: never)
    pre_resize_max_height: int = Field(0, ge=0)
    disk_headroom_bytes: int = Field(2**30, ge=0)

    # Files
    work_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "echoshotx")

    # AWS (S3 and SQS). AWS_ENDPOINT_URL points both at an S3/SQS-compatible server.
    aws_region: str = "ap-northeast-2"
    aws_endpoint_url: str | None = None
    sqs_queue_url: str | None = None
    # Several queues, comma-separated, highest priority first (e.g. standard, then basic, on a CPU worker):
    # a lower one is read when those above it are empty, and at least every QUEUE_STARVATION_S
    sqs_queue_urls: Annotated[list[str], NoDecode] = []
    queue_starvation_s: float = Field(300, gt=0)
    # Where each subscription tier's jobs go, for `echoshot enqueue --tier` (Spring keeps its own copy):
    # comma-separated tier=url pairs, e.g. premium=<gpu queue>,pro=<gpu queue>,standard=<...>,basic=<...>
    tier_queue_urls: Annotated[dict[str, str], NoDecode] = {}
    s3_bucket_name: str | None = None
    aws_connect_timeout_s: float = Field(5, gt=0)
    aws_read_timeout_s: float = Field(60, gt=0)

    # The worker
    worker_device: Literal["auto", "gpu", "cpu"] = "auto"
    # On a host with several GPUs, the one this worker uses (one worker process per GPU); unset: the first
    gpu_device_index: int | None = Field(None, ge=0)
    gpu_worker_count: int = Field(1, ge=1)
    # A job hands the model to the next one once its frames are done and finishes (x264's drain, checks,
    # upload, callback) beside it; unset: on for GPU workers (the GPU is free then), off for CPU ones
    overlap_finish: bool | None = None
    cpu_worker_count: int = Field(2, ge=1)
    poll_wait_s: int = Field(20, ge=0, le=20)
    visibility_timeout_s: int = Field(300, ge=1, le=43200)
    visibility_extend_every_s: float = Field(60, gt=0)
    shutdown_grace_s: float = Field(60, ge=0)
    max_receive_count: int = Field(5, ge=1)
    retry_base_delay_s: int = Field(10, ge=0)
    retry_max_delay_s: int = Field(900, ge=0, le=43200)
    # Videos longer than this are cut into segments of about this length, each a message of its own
    # that any worker of the queue may take (0: every job in one piece). 15 s: a minute's video is 4
    # segments, which 1, 2 or 4 GPUs share evenly; each segment costs a few seconds more than its frames.
    segment_seconds: float = Field(15, ge=0)

    # The Spring callback
    spring_callback_url: str | None = None
    spring_callback_token: SecretStr | None = None
    spring_callback_secret: SecretStr | None = None
    callback_timeout_s: float = Field(10, gt=0)
    callback_max_attempts: int = Field(6, ge=1)
    callback_backoff_base_s: float = Field(1, ge=0)
    callback_backoff_max_s: float = Field(30, ge=0)
    progress_callback_interval_s: float = Field(10, ge=0)
    # How often a running job looks for Spring's cancel marker (control/cancel/{jobId} in the bucket)
    cancel_check_s: float = Field(2, gt=0)

    # Auto Scaling: the group this worker's instance belongs to, for the backlog figure and for
    # scale-in protection while a job runs (the instance id comes from the metadata service if unset)
    autoscaling_group_name: str | None = None
    protect_instance_while_busy: bool = False
    ec2_instance_id: str | None = None

    # Health and metrics (GET /healthz, GET /metrics); port 0 picks a free port
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9108, ge=0, le=65535)

    log_level: str = "INFO"

    @field_validator("tier_queue_urls", mode="before")
    @classmethod
    def _pairs(cls, value):
        if isinstance(value, str):
            pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("expected tier=url pairs separated by commas")
            return {tier.strip().lower(): url.strip() for tier, url in pairs}
        return value

    @field_validator("allowed_source_prefixes", "models", "sqs_queue_urls", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
