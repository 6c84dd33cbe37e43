"""Wiring: the settings, read once by the command line, turned into the worker and its parts.

The only module besides cli.py that reads `Settings`; everything below it gets plain values.
"""

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from echoshot_ai_server.app.estimate import ComputeEstimator
from echoshot_ai_server.app.pipeline import GPU_FALLBACK_WARNING, InputLimits
from echoshot_ai_server.config import Settings
from echoshot_ai_server.engine.device import (
    cpu_multiplies_bf16, gpu_memory_stats, gpu_name, kernel_cache_folder, resolve_device, use_kernel_cache,
    use_only_gpu,
)
from echoshot_ai_server.engine.specs import DEFAULT_MODEL, MODELS, X4PLUS, Device, ModelSpec, model_problem
from echoshot_ai_server.engine.upscaler import RunProfile, Upscaler, load_upscalers
from echoshot_ai_server.errors import ErrorCode, PermanentError, RetryableError
from echoshot_ai_server.media.writer import EncoderSettings

if TYPE_CHECKING:  # the AWS side is imported where it is built: the local pipeline needs no boto3
    from echoshot_ai_server.adapters.autoscaling import AutoScaling
    from echoshot_ai_server.adapters.s3 import Storage
    from echoshot_ai_server.adapters.sqs import JobQueue
    from echoshot_ai_server.app.protection import ScaleInProtection
    from echoshot_ai_server.app.worker import Worker

log = logging.getLogger(__name__)


def required(settings: Settings, *names: str) -> None:
    missing = [name.upper() for name in names if not getattr(settings, name)]
    if missing:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"required setting(s) not set: {', '.join(missing)}")


def build_worker(settings: Settings, upscalers: list[Upscaler | Mapping[str, Upscaler]] | None = None,
                 started: float | None = None) -> "Worker":
    """The worker as the settings describe it. `upscalers` replaces the model loading (tests): per
    slot, the models by name, or one upscaler that serves the default model.

    Checks first that the worker can work at all (the queue, the bucket, the work directory), so
    that a misspelt setting stops it at start with one clear line instead of failing every job."""
    from echoshot_ai_server.adapters.spring import SpringCallback
    from echoshot_ai_server.adapters.sqs import PriorityQueues
    from echoshot_ai_server.app.monitoring import Monitoring
    from echoshot_ai_server.app.records import JobRecords
    from echoshot_ai_server.app.task import UpscaleTask
    from echoshot_ai_server.app.worker import Worker
    from echoshot_ai_server.app.workspace import WorkerDirectory, check_writable, remove_stale_worker_dirs

    urls = queue_urls(settings)
    required(settings, "s3_bucket_name", "spring_callback_url")
    pick_gpu(settings)
    requested = "gpu" if settings.worker_device == "auto" else settings.worker_device
    device = resolve_device(requested)
    if device != requested and settings.worker_device != "auto":
        log.warning(GPU_FALLBACK_WARNING)
    slots = settings.gpu_worker_count if device == "gpu" else settings.cpu_worker_count

    queues = [queue_from(settings, url) for url in urls]
    job_queue = PriorityQueues(queues, starvation_s=settings.queue_starvation_s)
    storage = storage_from(settings)
    monitoring = Monitoring(
        queue_stale_after_s=settings.poll_wait_s + settings.aws_read_timeout_s + 30,
        gpu_memory=gpu_memory_stats if device == "gpu" else None,
    )
    redrive = {queue.url: queue.max_receive_count() for queue in queues}
    monitoring.queue_answered()
    for queue in queues:
        if redrive[queue.url] is None:
            log.warning("queue %s has no redrive policy: failed jobs are dropped after %d attempts", queue.name,
                        settings.max_receive_count)
    redrive_max = redrive[queues[0].url]
    storage.check_bucket()
    for stale in remove_stale_worker_dirs(settings.work_dir):
        log.warning("removed the files of a worker that died: %s", stale)
    directory = WorkerDirectory(settings.work_dir).open()
    log.info("work directory: %s", directory.path)

    def preflight() -> None:
        storage.check_bucket()
        try:
            directory.path.mkdir(mode=0o700, exist_ok=True)
            check_writable(directory.path)
        except OSError as exc:
            raise RetryableError(ErrorCode.WORK_DIR_UNUSABLE, f"cannot write in {directory.path}: {exc.strerror}") from exc

    callback = SpringCallback(
        settings.spring_callback_url,
        token=settings.spring_callback_token.get_secret_value() if settings.spring_callback_token else None,
        secret=settings.spring_callback_secret.get_secret_value() if settings.spring_callback_secret else None,
        timeout_s=settings.callback_timeout_s,
        max_attempts=settings.callback_max_attempts,
        backoff_base_s=settings.callback_backoff_base_s,
        backoff_max_s=settings.callback_backoff_max_s,
    )
    task = UpscaleTask(
        storage=storage,
        callback=callback,
        records=JobRecords(storage, lease_s=settings.visibility_timeout_s),
        work_dir=directory.path,
        encoder=encoder_settings(settings),
        ffprobe=settings.ffprobe_bin,
        progress_interval_s=settings.progress_callback_interval_s,
        limits=input_limits(settings),
        allowed_source_prefixes=tuple(settings.allowed_source_prefixes),
        disk_headroom_bytes=settings.disk_headroom_bytes,
        segment_s=settings.segment_seconds,
        estimator=ComputeEstimator(settings.max_job_seconds,
                                   on_measured=lambda model, speed: monitoring.model_speed.labels(model).set(speed)),
        pre_resize_max_height=settings.pre_resize_max_height,
        cancel_check_s=settings.cancel_check_s,
    )
    try:
        if upscalers is None:
            models = load_models(settings, device, slots)
        else:
            models = [u if isinstance(u, Mapping) else {DEFAULT_MODEL: u} for u in upscalers]
    except BaseException:
        directory.close()
        raise
    log.info("업스케일러 초기화 완료 - %s, slots: %d, models: %s", next(iter(models[0].values())).describe(), slots,
             ", ".join(models[0]))

    def warm_up() -> None:
        warm_up_models(settings, models, task.estimator)

    return Worker(
        job_queue=job_queue,
        task=task,
        callback=callback,
        models=models,
        max_receive_count=redrive_max or settings.max_receive_count,
        dead_letter_queue=redrive_max is not None,
        poll_wait_s=settings.poll_wait_s,
        visibility_timeout_s=settings.visibility_timeout_s,
        visibility_extend_every_s=min(settings.visibility_extend_every_s, settings.visibility_timeout_s / 3),
        shutdown_grace_s=settings.shutdown_grace_s,
        retry_base_delay_s=settings.retry_base_delay_s,
        retry_max_delay_s=settings.retry_max_delay_s,
        monitoring=monitoring,
        protection=scale_in_protection(settings),
        metrics_address=(settings.metrics_host, settings.metrics_port) if settings.metrics_enabled else None,
        directory=directory,
        preflight=preflight,
        warm_up=warm_up,
        started=started,
        redrive=redrive,
        overlap_finish=device == "gpu" if settings.overlap_finish is None else settings.overlap_finish,
    )


def warm_up_models(settings: Settings, models: list[Mapping[str, Upscaler]], estimator: ComputeEstimator) -> dict:
    """What a worker does before it is ready: tune and compile each slot's models, then measure each
    model's speed (the jobs' estimates come from it), then start compiling the fused engine's tail in
    the background. Returns the seconds each model's warm-up took."""
    seconds = {}
    for slot in models:
        for name, upscaler in slot.items():
            seconds[name] = seconds.get(name, 0.0) + upscaler.warm_up(tuned=tuned_file(settings))
    if sum(seconds.values()):
        log.info("GPU kernels tuned and compiled for every frame size in %.1fs", sum(seconds.values()))
    for name, upscaler in models[0].items():
        estimator.speed(name, upscaler)
    for slot in models:  # after the speeds: the compiler takes the CPU while it runs
        for upscaler in slot.values():
            upscaler.compile_tail()
    return seconds


def pick_gpu(settings: Settings) -> None:
    """GPU_DEVICE_INDEX: this process sees and uses that GPU of the host only. Asked for the GPU, a
    worker whose index names no GPU stops with that error rather than working on the CPU."""
    index = settings.gpu_device_index
    if index is None:
        return
    use_only_gpu(index)
    if resolve_device("gpu") == "gpu":
        log.info("GPU %d of the host: %s", index, gpu_name())
    elif settings.worker_device == "gpu":
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"GPU_DEVICE_INDEX={index}: this host has no such GPU")


def aws_timeouts(settings: Settings) -> dict[str, float]:
    return dict(connect_timeout_s=settings.aws_connect_timeout_s, read_timeout_s=settings.aws_read_timeout_s)


def storage_from(settings: Settings) -> "Storage":
    from echoshot_ai_server.adapters.s3 import Storage

    required(settings, "s3_bucket_name")
    return Storage(settings.s3_bucket_name, region=settings.aws_region, endpoint_url=settings.aws_endpoint_url,
                   **aws_timeouts(settings))


def queue_urls(settings: Settings) -> list[str]:
    """The queues a worker serves, highest priority first: SQS_QUEUE_URLS, else SQS_QUEUE_URL."""
    urls = settings.sqs_queue_urls or ([settings.sqs_queue_url] if settings.sqs_queue_url else [])
    if not urls:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, "required setting(s) not set: SQS_QUEUE_URL (or SQS_QUEUE_URLS)")
    return urls


def queue_from(settings: Settings, url: str | None) -> "JobQueue":
    """The queue at `url` (SQS_QUEUE_URL when None)."""
    from echoshot_ai_server.adapters.sqs import JobQueue

    url = url or settings.sqs_queue_url
    if not url:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, "no queue: pass --queue-url or set SQS_QUEUE_URL")
    return JobQueue(url, region=settings.aws_region, endpoint_url=settings.aws_endpoint_url, **aws_timeouts(settings))


def autoscaling_from(settings: Settings) -> "AutoScaling":
    from echoshot_ai_server.adapters.autoscaling import AutoScaling

    return AutoScaling(region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)


def encoder_settings(settings: Settings) -> EncoderSettings:
    return EncoderSettings(settings.x264_preset, settings.x264_crf, settings.audio_bitrate, settings.ffmpeg_bin,
                           settings.ten_bit_codec, settings.encode_part_s)


def input_limits(settings: Settings) -> InputLimits:
    return InputLimits(
        settings.max_input_width, settings.max_input_height, settings.max_input_pixels, settings.max_duration_s,
        settings.max_frame_count, settings.max_output_pixels, settings.max_download_bytes,
    )


def run_profile(settings: Settings, device: Device) -> RunProfile:
    """How the upscaler runs on `device`, as the settings say."""
    if device == "gpu":
        return RunProfile(settings.gpu_tile, settings.gpu_tile_pad, settings.gpu_tile_fallback, half=True,
                          batch_frames=settings.gpu_batch_frames, engine=settings.gpu_engine, pre_pad=settings.pre_pad,
                          tail_compile=settings.gpu_tail_compile,
                          # a capture must meet no other job's GPU work: graphs with one slot only
                          cuda_graphs=settings.gpu_cuda_graphs and settings.gpu_worker_count == 1)
    bf16 = settings.cpu_precision == "bf16" or (settings.cpu_precision == "auto" and cpu_multiplies_bf16())
    return RunProfile(settings.cpu_tile, settings.cpu_tile_pad, settings.cpu_tile_fallback, half=False, bf16=bf16,
                      batch_frames=settings.cpu_batch_frames, pre_pad=settings.pre_pad, channels_last=True)


def tuned_file(settings: Settings):
    """Where the fused engine's tuned tile shapes are kept, beside this GPU's kernels (None: not kept)."""
    if settings.kernel_cache_dir is None or resolve_device("gpu") != "gpu":
        return None
    return kernel_cache_folder(settings.kernel_cache_dir) / "tuned-tiles.json"


def served_models(settings: Settings) -> list[ModelSpec]:
    """The models this worker serves (MODELS; unset: every model the engine knows)."""
    for name in settings.models:
        if (problem := model_problem(name)) is not None:
            raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"MODELS: {problem}")
    return [MODELS[name] for name in settings.models] or list(MODELS.values())


def load_models(settings: Settings, device: Device, count: int = 1) -> list[dict[str, Upscaler]]:
    """Per worker slot, each served model by name (a slot runs one job at a time, so its models
    share the slot's memory)."""
    loaded = {spec.name: load_engine(settings, device, count, spec) for spec in served_models(settings)}
    return [{name: upscalers[slot] for name, upscalers in loaded.items()} for slot in range(count)]


def load_engine(settings: Settings, device: Device, count: int = 1, spec: ModelSpec = X4PLUS) -> list[Upscaler]:
    """The model loaded `count` times for `device`; weights that are missing or wrong are a clear error."""
    if device == "gpu" and settings.kernel_cache_dir is not None:
        log.info("GPU kernel cache: %s", use_kernel_cache(settings.kernel_cache_dir))
    try:
        return load_upscalers(settings.weights_dir, spec, device, run_profile(settings, device), count=count,
                              memory_limit_gb=settings.gpu_memory_limit_gb)
    except FileNotFoundError as exc:
        raise PermanentError(
            ErrorCode.WEIGHTS_MISSING,
            f"{exc}. Download them with 'mkdir -p {settings.weights_dir} && curl -L {spec.url} -o "
            f"{settings.weights_dir / spec.weights_file}' or point WEIGHTS_DIR at their folder",
        ) from exc
    except ValueError as exc:
        raise PermanentError(ErrorCode.WEIGHTS_INVALID, str(exc)) from exc


def scale_in_protection(settings: Settings) -> "ScaleInProtection | None":
    from echoshot_ai_server.adapters.autoscaling import ec2_instance_id
    from echoshot_ai_server.app.protection import ScaleInProtection

    if not settings.protect_instance_while_busy:
        return None
    required(settings, "autoscaling_group_name")
    instance_id = settings.ec2_instance_id or ec2_instance_id()
    log.info("scale-in protection while busy: instance %s of %s", instance_id, settings.autoscaling_group_name)
    return ScaleInProtection(autoscaling_from(settings), settings.autoscaling_group_name, instance_id)
