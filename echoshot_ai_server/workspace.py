"""Per-job working directories: private, and removed on every way out."""

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
