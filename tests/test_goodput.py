"""Where a Trainer job's time goes across its attempts: its goodput (:mod:`ddpw.goodput`)."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
from jobs import (
    Blobs,
    ImportNotingTrainer,
    KillingTrainer,
    PausingTrainer,
    artefacts,
    goodput_of,
    job,
)

from ddpw import JobMode, JobPaused, Platform, PlatformConfig, WorkerError, Wrapper, world
from ddpw import checkpoint as ckpt
from ddpw.utils import heartbeat

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)


def test_a_paused_then_killed_then_resumed_job_accounts_for_every_second(tmp_path, capfd,
                                                                          monkeypatch):
    a_config = artefacts(validation_set=Blobs(30, seed=2))
    # A slow disk on rank 0: each save is published half a second late, which the waits for
    # it (the pause's, the end's) stall on.
    monkeypatch.setenv(ckpt.TEST_FAULT, "state.json:sleep=0.5")
    with pytest.raises(JobPaused):  # attempt 1: paused mid-epoch 2
        Wrapper(CPU2, a_config).start(PausingTrainer(job(tmp_path, epochs=3, save_every=1),
                                                     at=(2, 3)))
    with pytest.raises(WorkerError):  # attempt 2: killed in epoch 3, past checkpoint ckpt_2
        Wrapper(CPU2, a_config).start(KillingTrainer(
            job(tmp_path, start_at="latest", epochs=3, save_every=1), at=(3, 5)))
    capfd.readouterr()
    metrics = Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2), a_config).start(
        ImportNotingTrainer(job(tmp_path, start_at="latest", epochs=3, save_every=1)))
    printed = capfd.readouterr().out

    # Every attempt, tied into one job by the run id that the checkpoints keep; the parts add
    # up to the wall time, from the first launch to the end.
    attempts, summary = goodput_of(tmp_path / "logs")
    seconds = summary["seconds"]
    assert [a["ended"] for a in attempts] == ["paused", "running", "completed"]
    assert summary["attempts"] == 3 and len({a["run"] for a in attempts}) == 1
    assert summary["goodput_percent"] == pytest.approx(
        100 * seconds["training"] / summary["wall_s"])
    for part in ("startup", "training", "validation", "checkpoint", "restore", "waiting"):
        assert seconds[part] > 0, part
    # Start-up counts from the launch, before the worker process imported anything.
    assert attempts[-1]["start"] < metrics["imported"]
    # The pause lost nothing; the kill lost the steps from the checkpoint that the last
    # attempt resumed to the step where it died, and their time (the 1.2 s sleep among it).
    killed_at = int((tmp_path / "killed-at").read_text())
    assert attempts[1]["start_step"] == attempts[0]["end_step"]
    assert attempts[2]["start_step"] < attempts[1]["end_step"] == killed_at
    assert summary["lost_steps"] == killed_at - attempts[2]["start_step"] > 0
    assert 1.2 <= seconds["lost"] <= attempts[1]["seconds"]["training"]
    # The checkpoint stalls are the time that the checkpointer measured it held the caller
    # (at least the end's wait for its last save, on the slow disk).
    assert attempts[2]["checkpointer_blocked_s"] >= 0.25
    for attempt in (attempts[0], attempts[2]):
        blocked = attempt["checkpointer_blocked_s"]
        assert attempt["seconds"]["checkpoint"] == pytest.approx(blocked, rel=0.02, abs=0.05)
    # Printed once, at the end of the job.
    assert printed.count("[ddpw] goodput") == 1
    assert f"[ddpw] goodput {summary['goodput_percent']:.1f}%: training " in printed
    assert f"({summary['lost_steps']} steps recomputed)" in printed

    # An evaluation in this process (a world of one): its start-up counts from its launch. (It
    # opens no tracker, which the summary leaves alone.)
    evaluation = dataclasses.replace(job(tmp_path, mode=JobMode.EVALUATE, start_at="latest",
                                         log_with="tensorboard"),
                                     training_logs_path=str(tmp_path / "evaluation"))
    evaluated = Wrapper(CPU1, a_config).start(ImportNotingTrainer(evaluation))
    (attempt,), summary = goodput_of(tmp_path / "evaluation")
    assert attempt["start"] < evaluated["setup_began"]
    assert attempt["ended"] == "completed" and attempt["run"] is None
    assert summary["seconds"]["validation"] > 0 and summary["seconds"]["restore"] > 0


def napping(first_s: float, then_s: float) -> int:
    """Sleeps ``first_s`` before its first heartbeat, and ``then_s`` after it."""
    time.sleep(first_s)
    heartbeat("after the first nap")
    time.sleep(then_s)
    return world().global_rank


@pytest.mark.parametrize("n_procs", [1, 2])
def test_a_function_ends_with_its_start_up_to_the_first_heartbeat_and_its_run(capfd, n_procs):
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=n_procs)
    assert Wrapper(p_config).start(napping, 0.5, 0.3) == list(range(n_procs))
    (line,) = (line for line in capfd.readouterr().err.splitlines() if "goodput" in line)
    found = re.fullmatch(r"\[ddpw\] goodput ([\d.]+)%: run ([\d.]+) s of ([\d.]+) s \(start-up "
                         r"([\d.]+) s, from the launch to its first heartbeat\(\)\)", line)
    assert found, line
    percent, run, wall, start_up = map(float, found.groups())
    assert run >= 0.3 and start_up >= 0.5 and percent == pytest.approx(100 * run / wall, abs=3)
    assert run + start_up == pytest.approx(wall, abs=0.11)
