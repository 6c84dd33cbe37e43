"""How long a job's frames will take on this worker, known before they start: frames x the pixels the
model takes in per frame / the model's speed on this device (measured once, at start-up)."""

import logging
import math
import threading
from typing import Callable

from echoshot_ai_server.engine.specs import MODELS
from echoshot_ai_server.engine.upscaler import Upscaler
from echoshot_ai_server.errors import ErrorCode, PermanentError

log = logging.getLogger(__name__)


def human_duration(seconds: float) -> str:
    """61200 -> '17.0 h': durations in messages people read."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ComputeEstimator:
    """Each model's speed on this device, and the estimates and refusals made from it."""

    def __init__(self, max_job_s: float = 0, on_measured: Callable[[str, float], None] = lambda name, speed: None):
        """`max_job_s`: jobs estimated to take longer are refused (0: none is)."""
        self.max_job_s = max_job_s
        self.on_measured = on_measured
        self._speeds: dict[str, float] = {}
        self._lock = threading.Lock()  # one measurement at a time: two at once would each see half the device

    def speed(self, model: str, upscaler: Upscaler) -> float:
        """Pixels per second the model takes in on this device (measured on first use)."""
        with self._lock:
            if model not in self._speeds:
                speed = upscaler.measure_speed()
                self._speeds[model] = speed
                self.on_measured(model, speed)
                log.info("%s on this %s: %.0f pixels/s (%.2f TFLOP/s)", model, upscaler.device.upper(), speed,
                         speed * MODELS[model].mflop_per_pixel / 1e6 if model in MODELS else float("nan"))
            return self._speeds[model]

    def check(self, model: str, upscaler: Upscaler, frames: int, width: int, height: int) -> float:
        """The frames' compute time in seconds; JOB_TOO_LARGE when it is over the limit."""
        estimate = frames * upscaler.work_pixels(height, width) / self.speed(model, upscaler)
        if self.max_job_s and estimate > self.max_job_s:
            # Compute grows with the pixels: the height at which the same job would fit.
            fits_at = int(height * math.sqrt(self.max_job_s / estimate)) // 2 * 2
            hint = f"; at maxInputHeight {fits_at} it would fit" if fits_at >= 16 else ""
            raise PermanentError(
                ErrorCode.JOB_TOO_LARGE,
                f"{frames} frames of {width}x{height} with {model} would take about {human_duration(estimate)} on this "
                f"{upscaler.device.upper()} worker, more than its limit of {human_duration(self.max_job_s)} "
                f"(MAX_JOB_SECONDS){hint}",
            )
        log.info("estimated compute: %s for %d frames of %dx%d with %s", human_duration(estimate), frames, width, height,
                 model)
        return estimate
