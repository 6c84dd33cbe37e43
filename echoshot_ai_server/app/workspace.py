"""Working directories: one per worker process, one per job inside it; private, and removed on every way out.

Several workers may share one WORK_DIR: replicas of a container on one volume (each of them PID 1
in its own PID namespace), or hosts on a shared file system. A worker's folder is therefore named
by a random id, not by its PID, and is owned through an exclusive lock (flock) on a lock file
beside it, held for the life of the process. The kernel drops the lock when the process dies,
however it dies, so a folder whose lock can be taken belongs to a dead worker and can be removed;
a live worker's folder never can, whatever PID namespace or container the two are in.
"""

import fcntl
import os
import re
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from echoshot_ai_server.errors import ErrorCode, RetryableError

PREFIX = "worker-"
LOCK_SUFFIX = ".lock"


@contextmanager
def job_workspace(work_dir: Path, job_id: str) -> Iterator[Path]:
    """A fresh directory (mode 0700) under work_dir for one job's files, deleted when the job ends."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:64] + "-"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
    except OSError as exc:
        raise RetryableError(ErrorCode.WORK_DIR_UNUSABLE, f"cannot create a job folder in the work directory: {exc.strerror}") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class WorkerDirectory:
    """This process's folder under the work directory, `worker-<host>-<pid>-<random>/`, and its lock."""

    def __init__(self, work_dir: Path):
        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
        self.name = f"{PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self.path = work_dir / self.name
        self._lock_path = work_dir / (self.name + LOCK_SUFFIX)
        self._lock_fd: int | None = None

    def open(self) -> "WorkerDirectory":
        """Take the lock, then create the folder. Raises RetryableError(WORK_DIR_UNUSABLE)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self._lock_path, blocking=True)
            self.path.mkdir(mode=0o700)
            check_writable(self.path)
        except OSError as exc:
            self.close()
            raise RetryableError(
                ErrorCode.WORK_DIR_UNUSABLE, f"work directory {self.path.parent} is not usable: {exc.strerror or exc}"
            ) from exc
        return self

    def close(self) -> None:
        """Remove the folder and everything in it, then the lock file."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None


def check_writable(folder: Path) -> None:
    """Raises OSError unless a file can be created, written and removed in `folder`."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-") as probe:
        probe.write(b"ok")
        probe.flush()
        os.fsync(probe.fileno())


def remove_stale_worker_dirs(work_dir: Path) -> list[Path]:
    """Delete the folders of worker processes that died without cleaning up (SIGKILL, OOM killer,
    power loss), in this container or any other sharing the directory. Returns what was removed."""
    removed = []
    for lock_path in sorted(work_dir.glob(f"{PREFIX}*{LOCK_SUFFIX}")):
        try:
            fd = _lock(lock_path, blocking=False)
        except (BlockingIOError, FileNotFoundError):
            continue  # alive, or removed by another worker's sweep just now
        try:
            folder = lock_path.with_name(lock_path.name.removesuffix(LOCK_SUFFIX))
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _lock(path: Path, *, blocking: bool) -> int:
    """An fd holding an exclusive flock on `path` (created if need be). Loops until the file locked is
    still the one at `path`: another worker's sweep may unlink it between the open and the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if blocking else os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not blocking:
            raise FileNotFoundError(path)
