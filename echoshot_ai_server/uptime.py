"""When this process started, as the kernel saw it: the interpreter's own start-up and every import
before ours (torch's takes seconds) count towards a worker's start-up time."""

import os
import time


def process_started() -> float:
    """The process's start on the `time.monotonic()` clock (Linux's /proc; elsewhere: now)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        running = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()
    return time.monotonic() - max(0.0, running)
