"""Signals to the caller of a local 2-process job: the third kills a job that does not stop; and
the crash tests' hook that sends a second pause signal mid-save survives any number of them.

(Each pause signal pausing a Trainer is tested in test_checkpoints.py.)"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time

import psutil
from jobs import wait_for_ranks


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
    workers = [psutil.Process(pid) for pid in wait_for_ranks(tmp_path, caller)]
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


def test_the_hook_that_signals_mid_save_survives_100_signals_among_busy_threads(
        tmp_path):
    """The hook (``FILE:sigterm=PID``) waits until the signal it sent has reached the process's
    pause handler. It once learnt that from faulthandler's dump of every thread, from inside the
    signal handler, which crashes the process now and then (SIGSEGV) while other threads run
    Python or start and end: that silently lost rank 0 of a test run, 1 in 3."""
    script = tmp_path / "hook.py"
    script.write_text(textwrap.dedent(f"""
        import os, threading
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from ddpw.checkpoint import TEST_FAULT, write_json
        from ddpw.vote import PauseVote

        os.environ[TEST_FAULT] = f"x.json:sigterm={{os.getpid()}}"
        done = threading.Event()

        def churn():  # threads that start, run Python and end, as writers' pools did
            while not done.is_set():
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(sum, range(100)).result()

        def write():
            for _ in range(100):
                write_json(Path({str(tmp_path)!r}, "x.json"), {{}})

        for _ in range(3):
            threading.Thread(target=churn, daemon=True).start()
        vote = PauseVote()
        with vote.on_signals(["SIGTERM"]):
            with ThreadPoolExecutor(1) as writer:  # the hook runs in the writer's thread
                writer.submit(write).result()
        done.set()
        print("requested", vote.requested)
    """))
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)  # a bound for a busy machine: 5 to 10 s here
    assert ran.returncode == 0, (ran.returncode, ran.stderr[-2000:])
    assert ran.stdout.split() == ["requested", "True"]
    assert ran.stderr.count("received it back, going on") == 100
