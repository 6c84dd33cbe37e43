"""A disk that fills up while a job runs (other jobs, other replicas): on a real, small file system
(tmpfs), at each stage. Disk exhaustion is always retryable and reported as such, never a bad video."""

from concurrent.futures import wait

import pytest

from conftest import fill, make_noise_clip
from fault_proxy import FaultProxy, s3_get
from worker_harness import SlowUpscaler, enqueue, leftovers, make_worker, queue_counts, run_jobs, statuses, upload_clip, wait_until

def noisy_clip(stack, tmp_path, job_id):
    clip = make_noise_clip(tmp_path / "noise.mp4")  # about 33 KB; its result at 2x about 60 KB
    key = "uploads/user123/noise.mp4"
    stack.s3.upload_file(str(clip), "echoshotx-videos", key)
    enqueue(stack, key, job_id)


def started(stack, job_id):
    return lambda: any((b.get("progress") or 0) > 0 for b in stack.receiver.bodies(job_id))


@pytest.mark.parametrize("leave_kb", [0, 24], ids=["nothing-left", "trailer-does-not-fit"])
def test_the_disk_filling_up_while_encoding_is_retried(stack, tmp_path, small_disk, caplog, leave_kb):
    # Given a job that passed the disk check, whose encoder then meets a disk that others filled up
    noisy_clip(stack, tmp_path, "j-full")
    worker = make_worker(stack, [SlowUpscaler(0.15)], work_dir=small_disk, disk_headroom_bytes=0)
    [future] = worker.run_once()
    wait_until(started(stack, "j-full"), 30, "the job never started")
    filler = fill(small_disk, leave_kb * 1024)
    wait([future])

    # Then the job is not a bad video: nothing is reported yet, the message comes back, nothing is left
    assert "[INSUFFICIENT_DISK]" in caplog.text and "INVALID_VIDEO" not in caplog.text
    assert statuses(stack, "j-full") == ["PROCESSING"] * len(statuses(stack, "j-full"))
    assert queue_counts(stack) == (1, 0) and leftovers(small_disk) == [filler]

    # And once there is room again, the job completes
    filler.unlink()
    run_jobs(worker)
    assert statuses(stack, "j-full")[-1] == "COMPLETED"


def test_the_disk_filling_up_while_downloading_is_retried(stack, tmp_path, small_disk, caplog):
    noisy_clip(stack, tmp_path, "j-full-download")
    with FaultProxy(stack.moto.endpoint_url) as proxy:
        proxy.slow(s3_get("noise.mp4"), seconds=2, times=1)  # time to fill the disk after the check
        worker = make_worker(stack, aws_endpoint_url=proxy.url, work_dir=small_disk, disk_headroom_bytes=0)
        [future] = worker.run_once()
        wait_until(lambda: leftovers(small_disk), 30, "the job never started")  # its folder, before the download
        filler = fill(small_disk, 0)
        wait([future])
    assert "[INSUFFICIENT_DISK] the work directory is full" in caplog.text
    assert statuses(stack, "j-full-download") == []  # retryable, and no estimate was made yet
    assert queue_counts(stack) == (1, 0) and leftovers(small_disk) == [filler]


def test_too_little_room_is_said_in_words(stack, make_clip, caplog):
    enqueue(stack, upload_clip(stack, make_clip), "j-room")
    run_jobs(make_worker(stack, disk_headroom_bytes=10**18))
    assert "1.0 EB needed" not in caplog.text and "0.0 GB" not in caplog.text
    assert " free in the work directory, 1000.0 PB needed (a " in caplog.text
