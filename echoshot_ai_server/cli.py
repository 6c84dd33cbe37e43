"""The `echoshot` command: upscale a local file, check the environment."""

from echoshot_ai_server.uptime import process_started

PROCESS_STARTED = process_started()  # a worker's start-up time counts the interpreter's start and every import

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from echoshot_ai_server.app.cancel import cancel_key
from echoshot_ai_server.app.doctor import check_environment
from echoshot_ai_server.app.operations import publish_backlog, replay_dead_letters
from echoshot_ai_server.app.pipeline import upscale_video, validate_scale
from echoshot_ai_server.app.wiring import (
    autoscaling_from, build_worker, encoder_settings, input_limits, load_engine, load_models, pick_gpu, queue_from,
    served_models, storage_from, tuned_file,
)
from echoshot_ai_server.app.workspace import job_workspace
from echoshot_ai_server.config import Settings
from echoshot_ai_server.engine.device import kernel_cache_folder, resolve_device
from echoshot_ai_server.engine.specs import DEFAULT_MODEL, MODELS, SUPPORTED_SCALES, ModelSpec
from echoshot_ai_server.errors import ErrorCode, JobError, PermanentError
from echoshot_ai_server.job import JOB_ID_PATTERN, job_message_body, output_key
from echoshot_ai_server.logs import configure_logging, job_context

log = logging.getLogger(__name__)
RULE = "=" * 70
# The guide's subscription tiers and the device each one's jobs run on (구독 티어별 권장 설정)
TIERS = {"basic": "cpu", "standard": "cpu", "premium": "gpu", "pro": "gpu"}


def _print_block(title: str, lines: list[str]) -> None:
    print(RULE)
    print(title)
    print(RULE)
    for line in lines:
        print(line)
    print(RULE, flush=True)


def check_env(settings: Settings, models: list[ModelSpec] | None = None) -> bool:
    report = check_environment(ffmpeg=settings.ffmpeg_bin, ffprobe=settings.ffprobe_bin,
                               weights_dir=settings.weights_dir, models=models or served_models(settings))
    _print_block("환경 검증 중...", report.lines)
    return report.ok


def upscale(args: argparse.Namespace, settings: Settings) -> None:
    source = Path(args.input)
    validate_scale(args.scale)
    if not source.is_file():
        raise PermanentError(ErrorCode.INPUT_NOT_FOUND, f"input file not found: {source}")
    model = MODELS[args.model]
    if not args.no_validation and not check_env(settings, [model]):
        raise PermanentError(ErrorCode.TOOL_MISSING, "environment check failed (see the report above)")

    output_dir = Path(args.output)
    job_id = f"test_{datetime.now():%Y%m%d_%H%M%S}"
    _print_block(
        "업스케일 테스트 시작",
        [f"입력 파일: {source}", f"출력 디렉토리: {output_dir}", f"스케일: {args.scale}x", f"디바이스: {args.device.upper()}",
         f"모델: {model.name}"],
    )

    def get_upscaler():
        return load_engine(settings, resolve_device(args.device), spec=model)[0]

    bars = []

    def on_progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="frame", desc="업스케일", dynamic_ncols=True, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    with job_context(job_id), job_workspace(settings.work_dir, job_id) as workspace, logging_redirect_tqdm():
        try:
            result = upscale_video(
                source,
                workspace / "output.mp4",
                scale=args.scale,
                device=args.device,
                get_upscaler=get_upscaler,
                encoder=encoder_settings(settings),
                ffprobe=settings.ffprobe_bin,
                on_progress=on_progress,
                limits=input_limits(settings),
                max_input_height=args.max_input_height or settings.pre_resize_max_height,
            )
        finally:
            for bar in bars:
                bar.close()
        output_dir.mkdir(parents=True, exist_ok=True)
        final = output_dir / f"{job_id}_{source.stem}_upscaled.mp4"
        shutil.move(workspace / "output.mp4", final)
        log.info("✅ 업스케일 완료! 결과 파일: %s", final)

    lines = [
        "✅ 업스케일 성공!",
        f"Job ID: {job_id}",
        f"출력 키: {output_key(job_id, source.name)}",
        f"결과 파일: {final}",
        f"처리 시간: {result.elapsed_s:.1f}s",
        "메타데이터:",
    ] + [f"  - {key}: {value}" for key, value in result.metadata.model_dump().items()]
    print()
    _print_block(lines[0], lines[1:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echoshot", description="EchoShotX video upscaling worker")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upscale", help="upscale a local video file")
    up.add_argument("--input", required=True, help="video file to upscale")
    up.add_argument("--scale", type=int, choices=SUPPORTED_SCALES, default=2, help="output scale (default 2)")
    up.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="device (default cpu)")
    up.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_MODEL, help=f"network (default {DEFAULT_MODEL})")
    up.add_argument("--max-input-height", type=int, default=0, help="scale taller sources down to this height "
                    "first (default: PRE_RESIZE_MAX_HEIGHT, 0: never)")
    up.add_argument("--output", default="output_upscaled", help="output directory (default output_upscaled/)")
    up.add_argument("--no-validation", action="store_true", help="skip the environment report")

    commands.add_parser("check-env", help="report PyTorch, CUDA, GPU, ffmpeg and the model weights")

    commands.add_parser("worker", help="run the worker daemon (SQS -> upscale -> S3 -> Spring callback)")

    commands.add_parser("warm-up", help="tune and compile the GPU engine into KERNEL_CACHE_DIR, so that workers "
                        "on this kind of GPU start without tuning")

    enq = commands.add_parser("enqueue", help="send a job to the queue exactly as Spring does")
    enq.add_argument("--source", required=True, help="S3 key of the source video in S3_BUCKET_NAME")
    enq.add_argument("--scale", type=int, required=True, help="scale_factor (2 or 4)")
    enq.add_argument("--device", default=None, help="device (gpu or cpu; default: the tier's)")
    enq.add_argument("--tier", choices=TIERS, default=None, help="subscription tier: its queue (TIER_QUEUE_URLS) "
                     "and device (basic, standard: cpu; premium, pro: gpu)")
    enq.add_argument("--model", choices=tuple(MODELS), default=None, help=f"network (default: the worker's, {DEFAULT_MODEL})")
    enq.add_argument("--max-input-height", type=int, default=None, help="parameters.maxInputHeight (default: none)")
    enq.add_argument("--job-id", default=None, help="job id (default: a new UUID)")
    enq.add_argument("--user-id", default=None, help="user id")
    enq.add_argument("--group-id", default=None, help="FIFO queues: MessageGroupId (default: the job id, so that "
                     "no two jobs wait on each other)")
    enq.add_argument("--queue-url", default=None, help="queue (default: SQS_QUEUE_URL)")

    cancel = commands.add_parser("cancel", help="cancel a job, queued or running, as Spring does (the marker "
                                 "control/cancel/{jobId} in S3_BUCKET_NAME)")
    cancel.add_argument("--job-id", required=True, help="the job to cancel")

    dlq = commands.add_parser("replay-dlq", help="move failed jobs from the dead-letter queue back to the job queue")
    dlq.add_argument("--queue-url", default=None, help="job queue (default: SQS_QUEUE_URL)")
    dlq.add_argument("--dlq-url", default=None, help="dead-letter queue (default: the job queue's redrive target)")
    dlq.add_argument("--max", type=int, default=None, help="replay at most this many")
    dlq.add_argument("--list", action="store_true", help="only show what is there")

    backlog = commands.add_parser("publish-backlog", help="publish BacklogPerWorker to CloudWatch for autoscaling")
    backlog.add_argument("--queue-url", default=None, help="job queue (default: SQS_QUEUE_URL)")
    backlog.add_argument("--workers", type=int, default=None, help="running workers (default: InService instances "
                         "of AUTOSCALING_GROUP_NAME)")
    backlog.add_argument("--every", type=float, default=0, help="repeat every N seconds (default: once)")
    return parser


def replay_dlq(args: argparse.Namespace, settings: Settings) -> None:
    target = queue_from(settings, args.queue_url)
    dlq_url = args.dlq_url or target.dead_letter_queue_url()
    if not dlq_url:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"{target.url} has no redrive policy: pass --dlq-url")
    dead_letters = queue_from(settings, dlq_url)
    job_ids = replay_dead_letters(dead_letters, target, limit=args.max, list_only=args.list)
    print(json.dumps({"deadLetterQueueUrl": dlq_url, "replayed" if not args.list else "waiting": job_ids}))


def publish_backlog_loop(args: argparse.Namespace, settings: Settings) -> None:
    job_queue = queue_from(settings, args.queue_url)
    if args.workers is None and not settings.autoscaling_group_name:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, "pass --workers or set AUTOSCALING_GROUP_NAME")
    autoscaling = autoscaling_from(settings)
    while True:
        figures = publish_backlog(job_queue, autoscaling, workers=args.workers, group=settings.autoscaling_group_name)
        print(json.dumps(figures), flush=True)
        if not args.every:
            return
        time.sleep(args.every)


def warm_up(settings: Settings) -> None:
    """Fill the kernel cache for this machine's GPU: what a worker would tune and compile at start."""
    pick_gpu(settings)
    if resolve_device("gpu") != "gpu":
        raise PermanentError(ErrorCode.TOOL_MISSING, "no CUDA GPU here: the kernel cache is made on the GPU it is for")
    if settings.kernel_cache_dir is None:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, "set KERNEL_CACHE_DIR to the folder the workers will read")
    [models] = load_models(settings, "gpu")
    started = time.monotonic()
    for upscaler in models.values():
        upscaler.warm_up(tuned=tuned_file(settings))
        if (compiling := upscaler.compile_tail()) is not None:
            compiling.join()  # into the cache too
    seconds = time.monotonic() - started
    print(json.dumps({"kernelCache": str(kernel_cache_folder(settings.kernel_cache_dir)),
                      "engines": {name: upscaler.engine for name, upscaler in models.items()}, "seconds": round(seconds, 1)}))


def enqueue(args: argparse.Namespace, settings: Settings) -> None:
    url = args.queue_url
    if args.tier is not None and url is None:
        url = settings.tier_queue_urls.get(args.tier)
        if url is None:
            raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"no queue for tier {args.tier}: set TIER_QUEUE_URLS "
                                 "(tier=url pairs) or pass --queue-url")
    args.device = args.device or (TIERS[args.tier] if args.tier else None)
    if args.device is None:
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, "pass --device or --tier")
    job_queue = queue_from(settings, url)
    job_id = args.job_id or str(uuid.uuid4())
    body = job_message_body(job_id, args.source, scale=args.scale, device=args.device, user_id=args.user_id,
                            model=args.model, maxInputHeight=args.max_input_height)
    message_id = job_queue.send(body, group_id=args.group_id or job_id, dedup_id=job_id)
    print(json.dumps({"jobId": job_id, "messageId": message_id, "queueUrl": job_queue.url}))


def cancel_job(args: argparse.Namespace, settings: Settings) -> None:
    if not re.fullmatch(JOB_ID_PATTERN, args.job_id):
        raise PermanentError(ErrorCode.INVALID_PARAMETERS, f"not a job id: {args.job_id!r}")
    key = cancel_key(args.job_id)
    storage_from(settings).put_json(key, {"jobId": args.job_id, "requestedAt": datetime.now().astimezone().isoformat(),
                                          "by": "echoshot cancel"})
    print(json.dumps({"jobId": args.job_id, "cancelKey": key}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
        configure_logging(settings.log_level)
        if args.command == "check-env":
            return 0 if check_env(settings) else 1
        if args.command == "worker":
            build_worker(settings, started=PROCESS_STARTED).run()
        elif args.command == "warm-up":
            warm_up(settings)
        elif args.command == "enqueue":
            enqueue(args, settings)
        elif args.command == "cancel":
            cancel_job(args, settings)
        elif args.command == "replay-dlq":
            replay_dlq(args, settings)
        elif args.command == "publish-backlog":
            publish_backlog_loop(args, settings)
        else:
            upscale(args, settings)
        return 0
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "?"
        print(f"error: invalid setting {name}: {first['msg']}", file=sys.stderr)
        return 1
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the commands people type, the traceback for the daemon's logs
        if args.command == "worker":
            log.exception("the worker stopped on an unexpected error")
        else:
            log.debug("traceback", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
