"""Signals to the caller of a local 2-process job: each pause signal pauses a Trainer, and the
third signal kills a job that does not stop."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from jobs import BlobTrainer, artefacts, final_files, job, step_lr, wait_for_mid_epoch

from ddpw import Platform, PlatformConfig, Wrapper
from ddpw import checkpoint as ckpt
from ddpw.errors import PAUSED_EXIT_STATUS

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
TESTS = Path(__file__).resolve().parent

#: A Trainer job that the test stops mid-epoch (argument 0) and resumes (argument "latest").
TRAIN = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    from pathlib import Path
    from jobs import SlowTrainer, artefacts, job, step_lr
    from ddpw import Platform, PlatformConfig, Wrapper

    start_at = sys.argv[1] if sys.argv[1] == "latest" else int(sys.argv[1])
    p = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    j = job(Path("."), start_at=start_at, epochs=3, save_every=3)
    Wrapper(p, artefacts(scheduler_loader=step_lr)).start(SlowTrainer(j))
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same job without a stop: the reference for the resumed ones."""
    path = tmp_path_factory.mktemp("uninterrupted")
    Wrapper(CPU2, artefacts(scheduler_loader=step_lr)).start(
        BlobTrainer(job(path, epochs=3, save_every=3)))
    return final_files(path / "checkpoint" / "ckpt_3")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR2])
def test_a_pause_signal_to_the_caller_pauses_mid_epoch_and_resumes_bitwise(
        tmp_path, uninterrupted, sig, no_leftover_processes):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    caller = subprocess.Popen([sys.executable, str(script), "0"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_mid_epoch(tmp_path, caller)
    caller.send_signal(sig)
    _, err = caller.communicate(timeout=120)
    assert caller.returncode == PAUSED_EXIT_STATUS, err
    paused_at = ckpt.latest(tmp_path / "checkpoint", "ckpt")
    assert paused_at is not None and paused_at.startswith("ckpt_1_batch"), paused_at
    ckpt.verify(tmp_path / "checkpoint" / paused_at)
    resumed = subprocess.run([sys.executable, str(script), "latest"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert final_files(tmp_path / "checkpoint" / "ckpt_3") == uninterrupted


def test_the_third_signal_kills_a_job_that_ignores_the_first_two(tmp_path,
                                                                 no_leftover_processes):
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        from pathlib import Path
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def stubborn():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            Path(f"ready-{world().global_rank}").write_text(str(os.getpid()))
            time.sleep(600)

        Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2)).start(stubborn)
    """))
    caller = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                              stderr=subprocess.PIPE)
    ready = [tmp_path / f"ready-{rank}" for rank in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(p.is_file() and p.read_text() for p in ready):
        assert time.monotonic() < deadline and caller.poll() is None, caller.communicate()
        time.sleep(0.2)
    workers = [psutil.Process(int(p.read_text())) for p in ready]
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            caller.send_signal(sig)
            time.sleep(1)  # one at a time: the same signal twice at once may count once
        _, err = caller.communicate(timeout=120)  # a bound for a busy machine, not a speed
        left = [worker.pid for worker in workers if alive(worker)]
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        for worker in workers:  # their parent-death signal is SIGTERM, which they ignore
            with contextlib.suppress(psutil.Error):
                worker.kill()
    assert caller.returncode == 1, err
    assert ("the job was stopped by SIGTERM; every process of it has ended (rank(s) 0, 1 did "
            "not stop and were killed with SIGKILL at the third signal)") in err
    assert not left, "processes of the job outlived it"


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
