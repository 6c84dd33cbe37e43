"""Running ffmpeg and ffprobe: file arguments that can never be options, and stops that end them."""

import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

from echoshot_ai_server.errors import ErrorCode, JobCancelled, PermanentError

StopCheck = Callable[[], bool]


def file_arg(path: Path) -> str:
    """A file argument for ffmpeg/ffprobe: absolute, so that a name starting with '-' is never an option."""
    return str(path.absolute())


def run_tool(args: list[str], what: str, should_stop: StopCheck | None = None) -> subprocess.CompletedProcess:
    """Run ffprobe/ffmpeg to the end; JobCancelled (the tool killed) as soon as `should_stop()` turns true."""
    try:
        # A session of its own, so that a stop ends the tool and anything it started (a wrapper's children)
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True)
    except FileNotFoundError as exc:
        raise PermanentError(ErrorCode.TOOL_MISSING, f"{args[0]} not found: install ffmpeg ({what})") from exc
    with process:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=0.2)
                return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                if should_stop is not None and should_stop():
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
                    raise JobCancelled() from None



def ffmpeg_version(ffmpeg: str = "ffmpeg") -> str:
    return run_tool([ffmpeg, "-version"], "version").stdout.splitlines()[0]
