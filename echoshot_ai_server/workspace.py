"""Per-job working directories: private, and removed on every way out."""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def job_workspace(work_dir: Path, job_id: str) -> Iterator[Path]:
    """A fresh directory (mode 0700) under work_dir for one job's files, deleted when the job ends."""
    work_dir.mkdir(parents=True, exist_ok=True)
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:64] + "-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def worker_dir(work_dir: Path, pid: int) -> Path:
    """The directory of one worker process's jobs: `worker-<pid>` under the work directory."""
    return work_dir / f"worker-{pid}"


def remove_stale_worker_dirs(work_dir: Path) -> list[Path]:
    """Delete the job directories of worker processes that died without cleaning up (SIGKILL, OOM
    killer, power loss). Directories of live processes are left alone. Returns what was removed."""
    removed = []
    for path in work_dir.glob("worker-*"):
        try:
            pid = int(path.name.removeprefix("worker-"))
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
