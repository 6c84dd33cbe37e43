"""Scale-in protection while this instance works: Auto Scaling never picks a busy instance to remove."""

import logging
import threading

from echoshot_ai_server.adapters.autoscaling import AutoScaling

log = logging.getLogger(__name__)


class ScaleInProtection:
    """Protects this instance from scale-in while at least one job runs, so that a scale-in never
    kills a job at 95 %. Failures are logged, never fatal: the job matters more than the flag."""

    def __init__(self, autoscaling: AutoScaling, group: str, instance_id: str):
        self.autoscaling, self.group, self.instance_id = autoscaling, group, instance_id
        self._running = 0
        self._lock = threading.Lock()

    def job_started(self) -> None:
        with self._lock:
            self._running += 1
            if self._running == 1:
                self._set(True)

    def job_ended(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._set(False)

    def _set(self, protected: bool) -> None:
        try:
            self.autoscaling.protect(self.group, self.instance_id, protected)
            log.info("scale-in protection %s for %s", "on" if protected else "off", self.instance_id)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("could not set scale-in protection: %s", exc)
