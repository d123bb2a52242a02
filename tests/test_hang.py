"""A hang is never silent (ddpw.hang): real processes, one of which stops, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hang_jobs import SkippingTrainer, SleepingTrainer, SlowStepTrainer, beating_then_sleeping
from jobs import artefacts, job

from ddpw import ConfigError, JobHung, Platform, PlatformConfig, WorkerError, Wrapper, hang
from ddpw import checkpoint as ckpt
from ddpw.errors import HUNG_EXIT_STATUS

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("ddpw-launch"))


def cpu2(timeout_s: float | None) -> PlatformConfig:
    return PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False,
                          hang_timeout_s=timeout_s)


def since_hang(folder: Path) -> float:
    return time.time() - float((folder / "hang-began").read_text())


def test_a_rank_asleep_in_train_step_is_named_with_every_stack_and_the_job_ends(
        tmp_path, capfd, no_leftover_processes):
    with pytest.raises(JobHung) as caught:
        Wrapper(cpu2(10), artefacts()).start(SleepingTrainer(job(tmp_path, epochs=2)))
    assert since_hang(tmp_path) < 25
    error = caught.value
    assert error.stuck == [1] and error.rank == 1 and error.status == HUNG_EXIT_STATUS
    assert "the stuck rank(s) of 2: rank 1 (" in error.message
    assert "in train_step (epoch 1, batch 5)" in error.message
    assert "time.sleep(3600)" in error.message
    stuck, waiting = error.details.split("\nrank 0 (")
    assert stuck.startswith("rank 1 (") and "hang_jobs.py" in stuck and "in train_step" in stuck
    # Rank 0 waited in the backward pass's all-reduce, until its collective timed out.
    assert waiting.split(":")[1].strip().startswith("waiting, in the backward pass")
    assert "backward" in waiting and "Timed out waiting 10000ms" in waiting
    # Every thread of every rank, in its stderr (here, the console).
    err = capfd.readouterr().err
    assert "[ddpw] rank 0: the job hung; every thread's stack follows" in err
    assert "[ddpw] rank 1: the job hung; every thread's stack follows" in err
    assert 'hang_jobs.py", line' in err and "in train_step" in err
    # py-spy's dump (the test extra installs it), with the native frames of the sleep.
    assert 'Thread' in err and "(idle): \"MainThread\"" in err and "time_sleep" in err


def test_a_skipped_collective_ends_the_job_with_the_stack_that_made_it(
        tmp_path, capfd, no_leftover_processes):
    """Rank 0 all-reduces where rank 1 does not: gloo meets rank 1's next collective (of
    another size) and aborts rank 0 at once; NCCL, which checks no sizes, would hang instead,
    and the watch would end it as above."""
    with pytest.raises(WorkerError) as caught:
        Wrapper(cpu2(10), artefacts()).start(SkippingTrainer(job(tmp_path, epochs=2)))
    assert since_hang(tmp_path) < 25
    assert caught.value.rank == 0 and "killed by SIGABRT" in caught.value.message
    err = capfd.readouterr().err
    assert "Is there a distributed collective mismatch in your code?" in err
    # faulthandler's dump of the aborted rank: where it made the collective.
    assert 'hang_jobs.py", line' in err and "in train_step" in err


def test_a_function_that_beats_is_watched_too(tmp_path, no_leftover_processes):
    with pytest.raises(JobHung) as caught:
        Wrapper(cpu2(5)).start(beating_then_sleeping, str(tmp_path), 20)
    assert since_hang(tmp_path) < 20
    assert caught.value.stuck == [1] and "after all-reduce 19" in caught.value.message
    assert "beating_then_sleeping" in caught.value.details


def test_steps_longer_than_a_tenth_of_the_timeout_are_no_hang(tmp_path):
    metrics = Wrapper(cpu2(5), artefacts(n_train=48, n_test=16)).start(
        SlowStepTrainer(job(tmp_path, epochs=1, save_every=0), seconds=2))
    assert metrics["epoch"] == 1


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_checkpoint_write_longer_than_the_timeout_is_no_hang(tmp_path, monkeypatch,
                                                               asynchronous):
    # Rank 1 writes the second share of the model: its disk takes 12 s over it.
    monkeypatch.setenv(ckpt.TEST_FAULT, "model-00002-of-00002.safetensors:sleep=12")
    metrics = Wrapper(cpu2(4), artefacts(n_train=48, n_test=16)).start(
        SlowStepTrainer(job(tmp_path, epochs=2, save_every=1,
                            async_checkpoint=asynchronous), seconds=0.2))
    assert metrics["epoch"] == 2
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_1", "ckpt_2"]


SLEEPY_SCRIPT = """\
import time
import torch
from accelerate import Accelerator

accelerator = Accelerator()
for step in range(1000):
    if step == 3 and accelerator.process_index == 1:
        time.sleep(3600)
    accelerator.reduce(torch.ones(1), reduction="sum")
"""


def test_a_plain_accelerate_script_that_hangs_is_ended_and_reported(tmp_path,
                                                                    no_leftover_processes):
    (tmp_path / "sleepy.py").write_text(SLEEPY_SCRIPT)
    started = time.monotonic()
    run = subprocess.run([CONSOLE_SCRIPT, "--platform", "cpu", "--n-procs", "2",
                          "--hang-timeout-s", "5", "sleepy.py"], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert run.returncode == HUNG_EXIT_STATUS, run.stderr
    assert time.monotonic() - started < 60
    assert "the stuck rank(s) of 2: rank 1 (" in run.stderr
    assert "at <module> (sleepy.py:8): time.sleep(3600)" in run.stderr
    assert "Timed out waiting 5000ms" in run.stderr  # rank 0's own wait, in the report
    folder = next((tmp_path / "logs" / "console_logs").iterdir())
    report = json.loads((folder / "hang-0.json").read_text())
    assert report["stuck"] == [1]
    # Rank 1's log holds every thread's stack, as faulthandler wrote it.
    assert 'sleepy.py", line 8 in <module>' in (folder / "rank-1.stderr.log").read_text()


def test_the_timeout_is_a_positive_number_or_none():
    assert cpu2(None).hang_timeout_s is None and cpu2(0.5).hang_timeout_s == 0.5
    for wrong in (0, -3, True, "300", float("inf")):
        with pytest.raises(ConfigError, match=r"hang_timeout_s=.* a positive number of "
                                              r"seconds, or None"):
            cpu2(wrong)


def test_ddpw_launch_passes_the_timeout_or_off_to_a_script(tmp_path):
    (tmp_path / "x.py").write_text("")
    for given, passed in (("off", "off"), ("12.5", "12.5"), (None, "300")):
        option = ["--hang-timeout-s", given] if given else []
        run = subprocess.run([CONSOLE_SCRIPT, "--platform", "cpu", "--n-procs", "2", *option,
                              "--dry-run", "x.py"], cwd=tmp_path, text=True,
                             capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["env"]["DDPW_HANG_TIMEOUT_S"] == passed
    run = subprocess.run([CONSOLE_SCRIPT, "--hang-timeout-s", "soon", "x.py"], cwd=tmp_path,
                         text=True, capture_output=True, timeout=60)
    assert run.returncode == 2 and "'soon' is neither a number of seconds nor 'off'" in run.stderr


class Store:
    """The few TCPStore calls that the judgement makes, on a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        return all(key in self.data for key in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.data[key] for key in keys]


def judge_of(world_size: int = 3, timeout_s: float = 10.0):
    watch = hang.Watch(timeout_s, 0, world_size, None)
    watch._store = Store()
    clock = [1000.0]

    def beat(rank: int, moves: int, **state) -> None:
        watch._store.set(watch._key(f"beat/{rank}"), json.dumps(
            {"moves": moves, "phase": "p", "busy": False, "armed": True, "waiting": False,
             "done": False, **state}))

    def judge(after_s: float = 0.0):
        clock[0] += after_s
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hang.time, "monotonic", lambda: clock[0])
            return watch._judge()

    return beat, judge


def test_the_judgement_names_the_rank_that_moved_least_once_all_are_quiet_for_t():
    beat, judge = judge_of()
    for rank, moves in ((0, 8), (1, 7), (2, 8)):
        beat(rank, moves)
    assert judge() is None
    assert judge(9.5) is None  # quiet, but not for T yet
    verdict = judge(1.0)
    assert verdict["stuck"] == [1] and verdict["waiting"] == [] and verdict["quiet_s"] == 10.5
    beat(2, 9)  # a rank that moves again holds the verdict off for another T
    assert judge() is None and judge(9.9) is None and judge(0.2) is not None


def test_the_judgement_spares_a_busy_rank_an_unarmed_one_and_a_job_that_ended():
    for state in ({"busy": True}, {"armed": False}, {"done": True}):
        beat, judge = judge_of()
        for rank in range(3):
            beat(rank, 5, **(state if rank == 2 else {}))
        assert judge() is None and judge(3600) is None, state


def test_a_timed_out_collective_is_a_verdict_at_once_against_the_ranks_not_waiting():
    beat, judge = judge_of()
    beat(0, 9, waiting=True)
    beat(1, 9)
    beat(2, 9, waiting=True)
    verdict = judge()
    assert verdict["stuck"] == [1] and verdict["waiting"] == [0, 2]


def test_the_report_puts_the_stuck_rank_first_with_its_frames():
    verdict = {"stuck": [1], "waiting": [0], "quiet_s": 10.0, "since": [0.0, 12.0]}
    frame = ["/x/train.py", 7, "train_step", "time.sleep(60)"]
    stacks = {0: {"host": "a", "pid": 1, "phase": "in the backward pass", "moves": 3,
                  "waiting": True, "frames": [["", 0, "RuntimeError", "Timed out"]]},
              1: {"host": "b", "pid": 2, "phase": "in train_step", "moves": 2,
                  "waiting": False, "frames": [frame]}}
    report = hang.compose(verdict, stacks, 2, 10.0)
    assert report["stuck"] == [1]
    assert report["message"] == (
        "the job hung: rank(s) 0 waited 10 s in a collective that never completed "
        "(hang_timeout_s=10); the stuck rank(s) of 2: rank 1 (b, pid 2), in train_step, at "
        "train_step (train.py:7): time.sleep(60)")
    first, second = report["details"].split("\n")[:2]
    assert first == ("rank 1 (b, pid 2): stuck, in train_step, last progress 12 s before the "
                     "verdict:")
    assert second == '  File "/x/train.py", line 7, in train_step'
    assert "rank 0 (a, pid 1): waiting, in the backward pass" in report["details"]
    assert "  RuntimeError: Timed out" in report["details"]
