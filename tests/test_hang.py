"""A hang is never silent (ddpw.hang): real processes, one of which stops, and the report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hang_jobs import (
    EvaluationSleepingTrainer,
    SkippingTrainer,
    SleepingTrainer,
    SlowFirstBlobs,
    SlowStartTrainer,
    beating_then_holding_the_gil,
)
from jobs import Blobs, artefacts, job

from ddpw import ConfigError, JobHung, Platform, PlatformConfig, WorkerError, Wrapper, hang
from ddpw import checkpoint as ckpt
from ddpw.errors import HUNG_EXIT_STATUS

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("ddpw-launch"))


def cpu2(timeout_s: float | None) -> PlatformConfig:
    return PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False,
                          hang_timeout_s=timeout_s)


def verdict_delay(details: str, folder: Path, rank: int) -> tuple[float, str]:
    """How long after the hang began (``hang-began`` in ``folder``) the verdict came, by the
    header of rank ``rank``'s stacks file that the report names; and that file's text."""
    named = re.search(r"Every thread's stack of each rank: (\S+)hang-0\.stacks\.log", details)
    stacks = Path(named.group(1)) / f"hang-{rank}.stacks.log"
    text = stacks.read_text()
    verdict = float(re.search(r"\(verdict at [^,]+, ([\d.]+)\)", text).group(1))
    return verdict - float((folder / "hang-began").read_text()), text


def test_a_rank_asleep_in_train_step_is_named_with_its_stack_and_the_job_ends(
        tmp_path, capfd, no_leftover_processes):
    with pytest.raises(JobHung) as caught:
        Wrapper(cpu2(5), artefacts()).start(SleepingTrainer(job(tmp_path, epochs=2)))
    error = caught.value
    assert error.stuck == [1] and error.rank == 1 and error.status == HUNG_EXIT_STATUS
    assert error.message.startswith("the job hung: no rank made progress for ")
    assert "the stuck rank(s) of 2: rank 1 (" in error.message
    assert "in train_step (epoch 1, batch 5)" in error.message
    assert "time.sleep(3600)" in error.message
    lines = error.details.splitlines()
    assert lines[0].startswith("rank 1 (") and lines[0].endswith("before the verdict:")
    assert 'hang_jobs.py", line' in error.details and "in train_step" in error.details
    # py-spy's view of the stuck rank (the test extra installs it), down to the native sleep.
    assert "  native frames (py-spy), innermost first:" in lines
    assert "    time_sleep (libpython" in error.details
    # One line for the rank that waited, in the backward pass's all-reduce.
    [other] = [line for line in lines if line.startswith("rank 0 (")]
    assert ": not stuck, in the backward pass (epoch 1, batch 5)" in other
    assert len(lines) < 35
    delay, stacks = verdict_delay(error.details, tmp_path, 1)
    assert delay < 5 + 10
    # Every thread of every rank, in its file: faulthandler's, then py-spy's.
    assert 'hang_jobs.py", line' in stacks and "(idle): \"MainThread\"" in stacks
    assert 'hang/__init__.py", line' in verdict_delay(error.details, tmp_path, 0)[1]
    # The console gets none of it: the report is the caller's to show.
    err = capfd.readouterr().err
    assert "every thread's stack follows" not in err and "py-spy" not in err
    shutil.rmtree(Path(stacks_named(error.details)))


def stacks_named(details: str) -> str:
    return re.search(r"Every thread's stack of each rank: (\S+)/hang-0", details).group(1)


def test_a_skipped_collective_ends_the_job_with_the_stack_that_made_it(
        tmp_path, capfd, no_leftover_processes):
    """Rank 0 all-reduces where rank 1 does not: gloo meets rank 1's next collective (of
    another size) and aborts rank 0 at once; NCCL, which checks no sizes, would hang instead,
    and the watch would end it as above."""
    with pytest.raises(WorkerError) as caught:
        Wrapper(cpu2(5), artefacts()).start(SkippingTrainer(job(tmp_path, epochs=2)))
    assert caught.value.rank == 0 and "killed by SIGABRT" in caught.value.message
    err = capfd.readouterr().err
    assert "Is there a distributed collective mismatch in your code?" in err
    # faulthandler's dump of the aborted rank: where it made the collective.
    assert 'hang_jobs.py", line' in err and "in train_step" in err


def test_a_judge_that_hangs_holding_the_gil_is_named_by_the_other(tmp_path,
                                                                   no_leftover_processes):
    """Rank 0 of a function that beats stops in native code that never releases the GIL: its
    watch thread stops with it, and the last rank, the other judge, names it, with py-spy's
    view of its stack from outside."""
    with pytest.raises(JobHung) as caught:
        Wrapper(cpu2(5)).start(beating_then_holding_the_gil, str(tmp_path), 20)
    error = caught.value
    assert error.stuck == [0] and "rank 0 (" in error.message
    assert error.message.endswith(", after all-reduce 19")
    assert "its stack did not arrive" in error.details
    assert "beating_then_holding_the_gil (hang_jobs.py:" in error.details
    assert "rank 1 (" in error.details.splitlines()[-2]
    assert verdict_delay(error.details, tmp_path, 1)[0] < 5 + 10
    shutil.rmtree(Path(stacks_named(error.details)))


def test_slow_set_up_first_step_and_first_evaluation_and_a_long_checkpoint_are_no_hang(
        tmp_path, monkeypatch):
    """With ``T`` = 4: rank 0 spends 5 s in set-up after the model is prepared (rank 1 waits
    in its first all-reduce); every rank's first step takes 5 s, and so does every rank's first
    validation batch (after the training steps have shown their pace: a first compilation in
    evaluation, a data source that warms up); rank 1's disk takes 8 s over its share of the
    checkpoint, written in the background. Torch would let all of it run: so does the watch."""
    monkeypatch.setenv(ckpt.TEST_FAULT, "model-00002-of-00002.safetensors:sleep=8")
    a_config = artefacts(n_train=48, n_test=16, validation_set=SlowFirstBlobs(16, 5))
    metrics = Wrapper(cpu2(4), a_config).start(
        SlowStartTrainer(job(tmp_path, epochs=2, save_every=2, async_checkpoint=True), 5))
    assert metrics["epoch"] == 2 and "val_loss" in metrics
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_2"]


def test_a_hang_in_evaluation_after_a_long_checkpoint_is_named(tmp_path, monkeypatch,
                                                                no_leftover_processes):
    """Rank 1's disk takes 2 T over its share of epoch 1's checkpoint, written in the
    foreground (no hang); then rank 1 stops in the first evaluation batch of epoch 2, which is
    judged by T: evaluation has shown its pace in epoch 1."""
    monkeypatch.setenv(ckpt.TEST_FAULT, "model-00002-of-00002.safetensors:sleep=8")
    a_config = artefacts(n_train=48, n_test=16, validation_set=Blobs(32, seed=2))
    with pytest.raises(JobHung) as caught:
        Wrapper(cpu2(4), a_config).start(
            EvaluationSleepingTrainer(job(tmp_path, epochs=2, save_every=1,
                                          async_checkpoint=False), at=(2, 1)))
    error = caught.value
    assert error.stuck == [1] and "in evaluate_step (evaluation batch 1)" in error.message
    [other] = [line for line in error.details.splitlines() if line.startswith("rank 0 (")]
    assert "gathering evaluation batch 1's metrics" in other
    assert ckpt.available(tmp_path / "checkpoint", "ckpt") == ["ckpt_1"]
    assert verdict_delay(error.details, tmp_path, 1)[0] < 4 + 10
    shutil.rmtree(Path(stacks_named(error.details)))


FIRST_SCRIPT = """\
import time
import torch
from accelerate import Accelerator

accelerator = Accelerator()
with accelerator.main_process_first():  # rank 1 waits in a barrier meanwhile
    if accelerator.is_main_process:
        time.sleep(5)  # tokenising a data set
assert accelerator.reduce(torch.ones(1), reduction="sum").item() == 2
"""


def test_a_plain_script_whose_main_process_goes_first_for_longer_than_the_timeout_ends_well(
        tmp_path):
    (tmp_path / "first.py").write_text(FIRST_SCRIPT)
    run = subprocess.run([CONSOLE_SCRIPT, "--platform", "cpu", "--n-procs", "2",
                          "--hang-timeout-s", "3", "first.py"], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr


SLEEPY_SCRIPT = """\
import time
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

# A limit shorter than torch's 30 minutes, which the watch keeps to in a script that never
# says it progressed.
accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=3))])
for step in range(1000):
    if step == 3 and accelerator.process_index == 1:
        time.sleep(3600)
    accelerator.reduce(torch.ones(1), reduction="sum")
"""


def test_a_plain_accelerate_script_that_hangs_is_ended_and_reported(tmp_path,
                                                                    no_leftover_processes):
    (tmp_path / "sleepy.py").write_text(SLEEPY_SCRIPT)
    run = subprocess.run([CONSOLE_SCRIPT, "--platform", "cpu", "--n-procs", "2",
                          "--hang-timeout-s", "60", "sleepy.py"], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert run.returncode == HUNG_EXIT_STATUS, run.stderr
    assert "rank(s) 0 waited in a collective until its timeout" in run.stderr
    assert "the stuck rank(s) of 2: rank 1 (" in run.stderr
    assert "at <module> (sleepy.py:13): time.sleep(3600)" in run.stderr
    assert "Timed out waiting 3000ms" in run.stderr  # rank 0's own wait, in one line
    assert len(run.stderr.splitlines()) < 40, run.stderr
    folder = next((tmp_path / "logs" / "console_logs").iterdir())
    report = json.loads((folder / "hang-0.json").read_text())
    assert report["stuck"] == [1]
    assert str(folder / "hang-0.stacks.log") in report["details"]
    # Rank 1's file holds every thread's stack, as faulthandler wrote it.
    assert 'sleepy.py", line 13 in <module>' in (folder / "hang-1.stacks.log").read_text()


def test_the_process_groups_are_never_given_less_than_torchs_timeout(monkeypatch):
    """T = 5 once made every process group give up after 5 s, the user's own included; now a
    T longer than torch's 30 minutes lengthens them, and a shorter one leaves them be."""
    from torch.distributed import distributed_c10d as c10d

    monkeypatch.setattr(c10d, "default_pg_timeout", timedelta(minutes=30))
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", timedelta(minutes=10))
    hang.lengthen_collectives(5)
    assert c10d.default_pg_timeout == timedelta(minutes=30)
    assert c10d.default_pg_nccl_timeout == timedelta(minutes=10)
    hang.lengthen_collectives(3600)
    assert c10d.default_pg_timeout == c10d.default_pg_nccl_timeout == timedelta(seconds=5400)


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
    """The few TCPStore calls that the judgement and the report make, on a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        if key not in self.data and not expected:
            self.set(key, desired)
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(key in self.data for key in keys)

    def get(self, key: str) -> bytes:
        return self.data[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.data[key] for key in keys]


def judge_of(world_size: int = 3, timeout_s: float = 10.0):
    watch = hang.Watch(timeout_s, 0, world_size, None)
    watch._store = Store()
    clock = [1000.0]

    def beat(rank: int, moves: int, **state) -> None:
        watch._store.set(watch._key(f"beat/{rank}"), json.dumps(
            {"moves": moves, "phase": "p", "busy": False, "armed": True, "waiting": False,
             "collective": False, "done": False, "host": "h", "pid": rank, **state}))

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


def test_a_rank_waiting_in_a_collective_is_not_the_stuck_one_whatever_its_moves():
    beat, judge = judge_of()
    beat(0, 8, collective=True)
    beat(1, 8)
    beat(2, 7, collective=True)
    assert judge() is None and judge(10.5)["stuck"] == [1]


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


def test_a_report_that_fails_still_ends_the_process_once(tmp_path, monkeypatch):
    """A full disk as the report is written: the process ends with the hang's status, at once
    (it once dumped its stacks again every second, for good)."""
    watch = hang.Watch(1.0, 1, 2, tmp_path, stacks=tmp_path)
    watch._store = Store()
    verdict = {"stuck": [1], "waiting": [], "quiet_s": 1.5, "judge": 0, "at": 0.0,
               "since": [1.5, 1.5], "stacks": str(tmp_path),
               "beats": [{"moves": 3, "phase": "p", "host": "h", "pid": 1}] * 2}
    watch._store.set(watch._key("verdict"), json.dumps(verdict))
    watch._store.set(watch._key("report"), json.dumps(hang.report.compose(verdict, {}, {}, 1.0)))

    def full(*args) -> None:
        raise OSError(28, "No space left on device")

    ended = []
    monkeypatch.setattr(hang.jobfolder, "write_json", full)
    monkeypatch.setattr(hang.os, "_exit", ended.append)
    watch._answer()
    assert ended == [HUNG_EXIT_STATUS]
    assert (tmp_path / "hang-1.stacks.log").is_file()


def test_the_report_puts_the_stuck_rank_first_with_its_frames_and_one_line_for_the_others():
    beats = [{"moves": 3, "phase": "in the backward pass", "host": "a", "pid": 1},
             {"moves": 2, "phase": "in train_step", "host": "b", "pid": 2},
             {"moves": 3, "phase": "in the backward pass", "host": "c", "pid": 3}]
    verdict = {"stuck": [1], "waiting": [0], "quiet_s": 10.0, "since": [0.0, 12.0, 3.0],
               "beats": beats, "stacks": "/logs", "at": 5.0}
    frame = ["/x/train.py", 7, "train_step", "time.sleep(60)"]
    stacks = {0: {"frames": [["/t/graph.py", 8, "backward", "run()"],
                             ["", 0, "RuntimeError", "Timed out"]]},
              1: {"frames": [frame]}}
    natives = {1: ["clock_nanosleep (libc.so.6)", "train_step (train.py:7)"]}
    report = hang.report.compose(verdict, stacks, natives, 10.0)
    assert report["stuck"] == [1] and report["at"] == 5.0
    assert report["message"] == (
        "the job hung: rank(s) 0 waited in a collective until its timeout "
        "(hang_timeout_s=10); the stuck rank(s) of 3: rank 1 (b, pid 2), in train_step, at "
        "train_step (train.py:7): time.sleep(60)")
    assert report["details"].splitlines() == [
        "rank 1 (b, pid 2): stuck, in train_step, last progress 12 s before the verdict:",
        '  File "/x/train.py", line 7, in train_step',
        "    time.sleep(60)",
        "  native frames (py-spy), innermost first:",
        "    clock_nanosleep (libc.so.6)",
        "rank 0 (a, pid 1): waited until its collective timed out, in the backward pass: "
        "RuntimeError: Timed out",
        "rank 2 (c, pid 3): not stuck, in the backward pass (its stack did not arrive)",
        "Every thread's stack of each rank: /logs/hang-0.stacks.log to hang-2.stacks.log, on "
        "its machine. A rank that was only slow needs a longer PlatformConfig.hang_timeout_s "
        "(ddpw-launch --hang-timeout-s); None (off) turns the watch off."]
