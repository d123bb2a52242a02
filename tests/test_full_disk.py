"""A real full disk: tmpfs mounts too small for a 2-process job's checkpoints."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import real_parts_required
from jobs import BlobTrainer, ErrorNotingTrainer, Net, artefacts, final_files, step_lr

from ddpw import JobConfig, JobMode, Platform, PlatformConfig, WorkerError, Wrapper
from ddpw import checkpoint as ckpt

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
#: A model big enough that its checkpoint spans many pages (about 200 kB with Adam's state).
HIDDEN = 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def mount_tmpfs(point: Path, size: int | str) -> None:
    """Mount a tmpfs of ``size`` bytes at ``point``, or skip (fail where
    :func:`conftest.real_parts_required`)."""
    point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]
    done = (subprocess.run(command, capture_output=True, text=True, timeout=60)
            if shutil.which("mount") else None)
    if done is None or done.returncode:
        why = done.stderr.strip() if done is not None else "no mount command"
        reason = f"cannot mount a tmpfs at {point} (it takes root and mount): {why}"
        if real_parts_required():
            pytest.fail(f"{reason}; CI or DDPW_REQUIRE_REAL=1 requires it", pytrace=False)
        pytest.skip(reason)


def unmount(point: Path) -> None:
    done = subprocess.run(["umount", str(point)], capture_output=True, text=True, timeout=60)
    if done.returncode:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=60)
        pytest.fail(f"could not unmount {point}: {done.stderr.strip()}", pytrace=False)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a tmpfs of ``size`` bytes at ``tmp_path/disk`` and returns it;
    it is unmounted after the test, whatever its outcome."""
    point = tmp_path / "disk"

    def mount(size: int) -> Path:
        mount_tmpfs(point, size)
        return point

    yield mount
    if point.is_mount():
        unmount(point)


@dataclass(frozen=True)
class Measured:
    """One epoch-1 checkpoint of :func:`training`, written on a roomy tmpfs."""

    checkpoint: int  #: the bytes its files take, as tmpfs counts them (whole pages)
    files: dict[str, bytes]  #: what :func:`~jobs.final_files` reads of it


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Measured:
    root = tmp_path_factory.mktemp("measure")
    roomy = root / "roomy"
    mount_tmpfs(roomy, "64m")
    try:
        Wrapper(CPU2, model_and_data()).start(BlobTrainer(training(roomy, root / "logs", 1)))
        assert sorted(os.listdir(roomy)) == ["ckpt_1", "ckpt_latest"]
        stats = os.statvfs(roomy)
        used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
        return Measured(used - PAGE, final_files(roomy / "ckpt_1"))  # the marker takes a page
    finally:
        unmount(roomy)


def training(checkpoint_path: Path, logs: Path, epochs: int, **overrides) -> JobConfig:
    return JobConfig(job_type=JobMode.TRAIN, epochs=epochs, save_every=1,
                     checkpoint_path=str(checkpoint_path), training_logs_path=str(logs),
                     **overrides)


def model_and_data():
    return artefacts(model=Net(HIDDEN), scheduler_loader=step_lr)


def no_space(path: str) -> str:
    """The pattern of a real full disk's error while writing ``path`` (a regular expression)."""
    return rf"OSError: \[Errno 28\] No space left on device: '{path}'"


def check_every_rank(logs: Path, folder: Path, full: str) -> None:
    """Each rank ended with ``full`` (a :func:`no_space` pattern) or a PeerFailed that quotes
    it, naming ``folder``; at least one with ``full`` itself."""
    errors = {rank: (logs / f"rank-{rank}.error").read_text() for rank in range(2)}
    peer = (rf"PeerFailed: checkpoint {re.escape(str(folder))} was not written: "
            rf"rank [01] failed with {full}")
    for rank, error in errors.items():
        assert re.fullmatch(f"{full}|{peer}", error), (rank, error)
    assert any(re.fullmatch(full, error) for error in errors.values()), errors


def test_a_real_full_disk_fails_every_rank_naming_it_and_keeps_the_previous_checkpoint(
        tmpfs, tmp_path, measured):
    # Room for the first checkpoint, its marker and half another: epoch 2's cannot be written.
    disk = tmpfs(measured.checkpoint + PAGE + measured.checkpoint // 2)
    logs = tmp_path / "logs"
    with pytest.raises(WorkerError, match=r"rank [01] of 2 raised an exception") as caught:
        Wrapper(CPU2, model_and_data()).start(
            ErrorNotingTrainer(training(disk, logs, 2, keep_last=1)))
    full = no_space(rf"{re.escape(str(disk / '.ckpt_2.partial'))}/[\w.-]+")
    assert re.search(full, caught.value.details), caught.value.details
    # Every rank ends with an error that names the disk: the file that could not be written.
    check_every_rank(logs, disk / "ckpt_2", full)
    # No partial folder or marker is left; the marker still names ckpt_1, which keep_last=1
    # did not delete for a checkpoint that never came.
    assert sorted(os.listdir(disk)) == ["ckpt_1", "ckpt_latest"]
    assert (disk / "ckpt_latest").read_text() == "ckpt_1\n"
    assert ckpt.resolve(disk, "ckpt", "latest") == "ckpt_1"
    ckpt.verify(disk / "ckpt_1")
    assert final_files(disk / "ckpt_1") == measured.files
    evaluator = BlobTrainer(JobConfig(job_type=JobMode.EVALUATE, start_at="latest",
                                      checkpoint_path=str(disk),
                                      training_logs_path=str(tmp_path / "evaluation")))
    metrics = Wrapper(CPU1, model_and_data()).start(evaluator)
    assert evaluator.resume_from == "ckpt_1"
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1


def test_a_disk_that_fills_at_the_latest_marker_publishes_nothing(tmpfs, tmp_path, measured):
    # Room for the checkpoint's files and manifest, not for the marker's page.
    disk = tmpfs(measured.checkpoint)
    logs = tmp_path / "logs"
    with pytest.raises(WorkerError, match=r"rank 0 of 2 raised an exception"):
        Wrapper(CPU2, model_and_data()).start(ErrorNotingTrainer(training(disk, logs, 1)))
    check_every_rank(logs, disk / "ckpt_1", no_space(re.escape(str(disk / ".ckpt_latest.partial"))))
    # Not a checkpoint in place that the job reported as not written, nor a stray marker.
    assert os.listdir(disk) == []


class WhereNotingTrainer(ErrorNotingTrainer):
    """Also notes where each rank was (epoch, batches done) when its error came, in
    ``{training_logs_path}/rank-R.where``."""

    def run(self):
        try:
            return super().run()
        except BaseException:
            Path(self.j_config.training_logs_path, f"rank-{self.global_rank}.where").write_text(
                f"{self.epoch} {self.batch}")
            raise


def test_a_disk_that_fills_during_a_background_write_stops_every_rank_at_one_boundary(
        tmpfs, tmp_path, measured):
    """Epoch 2's checkpoint fails in the background while epoch 3 trains: every rank raises
    the disk's error at the same step boundary, long before the last epoch."""
    disk = tmpfs(measured.checkpoint + PAGE + measured.checkpoint // 2)
    logs = tmp_path / "logs"
    epochs = 12
    with pytest.raises(WorkerError, match=r"rank [01] of 2 raised an exception") as caught:
        Wrapper(CPU2, model_and_data()).start(WhereNotingTrainer(
            training(disk, logs, epochs, keep_last=1, async_checkpoint=True)))
    full = no_space(rf"{re.escape(str(disk / '.ckpt_2.partial'))}/[\w.-]+")
    assert re.search(full, caught.value.details), caught.value.details
    check_every_rank(logs, disk / "ckpt_2", full)
    where = {(logs / f"rank-{rank}.where").read_text() for rank in range(2)}
    assert len(where) == 1, f"the ranks stopped at different boundaries: {where}"
    epoch, _ = map(int, where.pop().split())
    assert 3 <= epoch < epochs, f"the error came at epoch {epoch}, not while training went on"
    assert sorted(os.listdir(disk)) == ["ckpt_1", "ckpt_latest"]
    ckpt.verify(disk / "ckpt_1")
    assert final_files(disk / "ckpt_1") == measured.files
