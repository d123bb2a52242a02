"""Asynchronous checkpoints lose nothing: kills at random moments of the background writes, a
pause signal during one, a failure that only the background sees, one save at a time, and the
same bytes as a save in the loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import safetensors.torch
from async_jobs import SignalNotingTrainer, TwoSavesTrainer, WaitingTrainer
from jobs import BlobTrainer, Net, artefacts, final_files, job, step_lr, wait_for_ranks

from ddpw import JobConfig, JobMode, Platform, PlatformConfig, WorkerError, Wrapper
from ddpw import checkpoint as ckpt
from ddpw.checkpoint.names import sequence
from ddpw.errors import PAUSED_EXIT_STATUS

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
TESTS = Path(__file__).resolve().parent
#: A model whose checkpoint (about 4 MB with Adam's state) takes a while to write, hash and
#: flush: the background write is still going on while training goes on.
HIDDEN = 1 << 15
#: Rank 0's share of the model in a checkpoint of 2 processes: the first file it writes.
MODEL_0 = "model-00001-of-00002.safetensors"
#: A bound for a busy machine, not a speed.
BOUND_S = 120


def big(**overrides):
    return artefacts(model=Net(HIDDEN), **overrides)


def check_what_is_visible(root: Path, published: tuple[str, int] | None) -> str:
    """What a kill may leave: every checkpoint visible verifies, no folder named like a
    checkpoint lacks its manifest, and ``latest`` is one of them and no older than
    ``published`` (the latest checkpoint and its sequence just before the kill); return
    ``latest``."""
    names = ckpt.available(root, "ckpt")
    assert names, os.listdir(root)
    for name in names:
        ckpt.verify(root / name)
    named = sorted(e.name for e in root.iterdir() if ckpt.Position.parse(e.name, "ckpt"))
    assert named == sorted(names), f"a folder named like a checkpoint is not one: {named}"
    latest = ckpt.latest(root, "ckpt")
    assert latest in names
    if published is not None:
        assert sequence(root / latest) >= published[1], (
            f"{published[0]} was published before the kill, and latest is now the older "
            f"{latest}: {os.listdir(root)}")
    return latest


def latest_published(root: Path) -> tuple[str, int] | None:
    name = ckpt.latest(root, "ckpt")
    return None if name is None else (name, sequence(root / name))


def evaluate_latest(root: Path, logs: Path) -> str:
    """Evaluate ``start_at="latest"`` of ``root`` on one process; return the checkpoint used."""
    evaluator = BlobTrainer(JobConfig(job_type=JobMode.EVALUATE, start_at="latest",
                                      checkpoint_path=str(root), training_logs_path=str(logs)))
    metrics = Wrapper(CPU1, big()).start(evaluator)
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1, metrics
    return evaluator.resume_from


#: The kill trials' seed and number: one trial per victim here; ``scripts/async-kill-trials``
#: runs a long series. A failing trial comes back with the same victims and delays.
SEED = int(os.environ.get("DDPW_KILL_SEED", "14"))
TRIALS = int(os.environ.get("DDPW_KILL_TRIALS", "3"))
VICTIMS = ("caller", "rank 0", "rank 1")
#: Every write lasts this long at least: rank 0 sleeps after writing ``state.json``, its last
#: file but the index, so that a kill at a random moment of the write lands before its end.
SLOW_S = 0.5
#: How soon a rank whose peer was killed ends, at most: 0.3 to 0.4 s on a busy 2-core machine.
LOST_PEER_S = 4


def next_save(notes: socket.socket, caller: subprocess.Popen) -> str:
    """The checkpoint whose save returns next in the job of ``caller`` (its write then under way
    in the background), as rank 0's :class:`~async_jobs.PidTrainer` sends it to ``notes``."""
    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            return notes.recv(256).decode()
        except TimeoutError:  # notes wait a second at a time: the job may have ended
            assert caller.poll() is None, "the job ended before its next save"
            assert time.monotonic() < deadline, f"no save within {BOUND_S} s"


def newest_save(notes: socket.socket, name: str) -> str:
    """The newest checkpoint whose save has returned: ``name``, or one sent since."""
    while select.select([notes], [], [], 0)[0]:
        name = notes.recv(256).decode()
    return name


def kill_during_a_write(notes: socket.socket, caller: subprocess.Popen, root: Path, pid: int,
                        rng: random.Random) -> tuple[str, tuple[str, int] | None, bool]:
    """Once a checkpoint is published, kill ``pid`` with SIGKILL at a random moment of a
    background write; return that write's checkpoint, the latest checkpoint and its sequence
    just before the kill, and whether the kill landed during the write."""
    next_save(notes, caller)
    # Its save waited for the write before (one write at a time), which is now published.
    writing = next_save(notes, caller)
    while True:
        # Within the write for certain: it lasts SLOW_S at least, and the test may be held up
        # for a while between here and the kill on a busy machine.
        time.sleep(rng.uniform(0, SLOW_S - 0.15))
        writing = newest_save(notes, writing)
        if not (root / writing).exists():
            break
        writing = next_save(notes, caller)  # that write is over: draw again in the next
    published = latest_published(root)
    os.kill(pid, signal.SIGKILL)
    # Its save had returned before the kill; not in place after it: the kill came during it.
    return writing, published, not (root / writing).exists()


def test_a_kill_at_a_random_moment_of_a_background_write_loses_no_published_checkpoint(
        tmp_path):
    """Each trial resumes from ``latest``, trains saving after every epoch (two steps, shorter
    than a write), and is killed with SIGKILL, a rank or the caller (whose ranks then pause),
    at a random moment while a write is under way in the background."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        from pathlib import Path
        from async_jobs import PidTrainer
        from jobs import Net, artefacts
        from ddpw import JobConfig, JobMode, Platform, PlatformConfig, Wrapper
        from ddpw.checkpoint import TEST_FAULT

        os.environ[TEST_FAULT] = "state.json:sleep={SLOW_S}"
        here = Path(sys.argv[1])
        j = JobConfig(job_type=JobMode.TRAIN, start_at="latest", epochs=10**6, save_every=1,
                      keep_last=2, checkpoint_path=str(here / "checkpoint"),
                      training_logs_path=str(here / "logs"))
        p = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
        trainer = PidTrainer(j, str(here), notify=int(sys.argv[2]))
        Wrapper(p, artefacts(n_train=32, model=Net({HIDDEN}))).start(trainer)
    """))
    root = tmp_path / "checkpoint"
    # A caller killed leaves its job's temporary folder behind: here, not in /tmp.
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    rng = random.Random(SEED)
    victims = rng.sample([VICTIMS[trial % 3] for trial in range(TRIALS)], TRIALS)
    for trial, victim in enumerate(victims):
        for ready in tmp_path.glob("ready-*"):
            ready.unlink()
        err = tmp_path / f"caller-{trial}.err"
        with (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as notes,
              open(err, "w") as stderr):
            notes.bind(("127.0.0.1", 0))
            notes.settimeout(1)
            caller = subprocess.Popen(
                [sys.executable, str(script), str(tmp_path), str(notes.getsockname()[1])],
                env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
            ranks: list[psutil.Process] = []
            try:
                ranks = [psutil.Process(pid) for pid in wait_for_ranks(tmp_path, caller)]
                pid = caller.pid if victim == "caller" else ranks[int(victim[-1])].pid
                writing, published, landed = kill_during_a_write(notes, caller, root, pid, rng)
                killed = time.monotonic()
                if victim != "caller":  # the other rank fails of its lost peer
                    ranks[1 - int(victim[-1])].wait(timeout=BOUND_S)
                survived_s = time.monotonic() - killed
                caller.wait(timeout=BOUND_S)
                _, alive = psutil.wait_procs(ranks, timeout=BOUND_S)
                assert not alive, f"trial {trial}: the ranks did not end"
                ended_s = time.monotonic() - killed
            finally:
                if caller.poll() is None:
                    caller.kill()
                    caller.wait()
                for rank in ranks:
                    with contextlib.suppress(psutil.Error):
                        rank.kill()
        said = err.read_text()
        where = (f"trial {trial} (seed {SEED}), {victim} killed while {writing} was written, "
                 f"{published and published[0]} published")
        assert landed, f"{where}: the kill came after that write"
        assert published is not None, where
        latest = check_what_is_visible(root, published)
        if victim == "caller":
            # Its ranks, which lost their parent, paused: a checkpoint newer than any before.
            assert sequence(root / latest) > published[1], where
        else:
            assert caller.returncode == 1, (where, said)
            assert f"{victim} of 2 died (killed by SIGKILL)" in said, (where, said)
            # Its peer ended at once, not after the hang watch's wait for a verdict that no
            # rank posts (2 x 3 s, which held every killed job for 6.7 s).
            assert survived_s < LOST_PEER_S, f"{where}: its peer ended {survived_s:.1f} s after"
        assert evaluate_latest(root, tmp_path / "evaluation") == latest, where
        print(f"{where}: latest {latest}, left {sorted(os.listdir(root))}; the job ended "
              f"{ended_s:.2f} s after the kill")
    # The next save of a job cleans up what a kill left.
    assert len(ckpt.available(root, "ckpt")) <= 3, os.listdir(root)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Three epochs, a checkpoint after each, without a stop: the reference of the resumes."""
    path = tmp_path_factory.mktemp("uninterrupted")
    Wrapper(CPU2, big(scheduler_loader=step_lr)).start(
        SignalNotingTrainer(job(path, epochs=3, save_every=1), epoch=1, where=None))
    return final_files(path / "checkpoint" / "ckpt_3")


@pytest.mark.parametrize("where", ["boundary", "mid-epoch"])
def test_sigterm_during_a_background_write_waits_for_it_pauses_and_resumes_bitwise(
        tmp_path, uninterrupted, where):
    """The fault hook sends SIGTERM to the caller once rank 0 has written its model share of
    the checkpoint of epoch 1, and waits for it to come back through the caller: the pause
    comes while that checkpoint is written in the background."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        from pathlib import Path
        from async_jobs import SignalNotingTrainer
        from jobs import Net, artefacts, job, step_lr
        from ddpw import Platform, PlatformConfig, Wrapper
        from ddpw.checkpoint import TEST_FAULT

        first = sys.argv[1] == "first"
        if first:
            os.environ[TEST_FAULT] = f"{MODEL_0}:sigterm={{os.getpid()}}"
        p = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
        j = job(Path("."), start_at=0 if first else "latest", epochs=3, save_every=1)
        trainer = SignalNotingTrainer(j, epoch=1, where={where!r} if first else None)
        Wrapper(p, artefacts(model=Net({HIDDEN}), scheduler_loader=step_lr)).start(trainer)
    """))
    caller = subprocess.Popen([sys.executable, str(script), "first"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = caller.communicate(timeout=BOUND_S)
    assert caller.returncode == PAUSED_EXIT_STATUS, err
    hook = (f"{ckpt.TEST_FAULT}: wrote {Path('checkpoint', '.ckpt_1.partial', MODEL_0)}, sent "
            f"SIGTERM to {caller.pid}, received it back, going on")
    assert hook in err, err  # the signal came during the epoch's write
    root = tmp_path / "checkpoint"
    # The checkpoint that was being written when the signal came is in place, whole; the pause
    # within epoch 2 wrote its own after it.
    paused_at = ckpt.latest(root, "ckpt")
    if where == "boundary":
        assert ckpt.available(root, "ckpt") == ["ckpt_1"] and paused_at == "ckpt_1"
    else:
        assert ckpt.available(root, "ckpt") == ["ckpt_1", paused_at], os.listdir(root)
        assert re.fullmatch(r"ckpt_1_batch\d+", paused_at), paused_at
        assert sequence(root / paused_at) > sequence(root / "ckpt_1")
    for name in ckpt.available(root, "ckpt"):
        ckpt.verify(root / name)
    assert not list(root.glob(".*")), os.listdir(root)
    resumed = subprocess.run([sys.executable, str(script), "resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=BOUND_S)
    assert resumed.returncode == 0, resumed.stderr
    assert final_files(root / "ckpt_3") == uninterrupted


@pytest.mark.parametrize("asynchronous", [True, False])
def test_wait_for_checkpoint_raises_the_error_of_a_save_that_failed_in_the_background(
        tmp_path, monkeypatch, asynchronous):
    monkeypatch.setenv(ckpt.TEST_FAULT, "rank-1.json:full")
    with pytest.raises(WorkerError, match="rank 1 of 2 raised") as caught:
        Wrapper(CPU2, artefacts()).start(WaitingTrainer(
            job(tmp_path, epochs=1, async_checkpoint=asynchronous), at=2))
    assert "No space left on device" in caught.value.details
    root = tmp_path / "checkpoint"
    full = (rf"OSError: \[Errno 28\] No space left on device \(injected by "
            rf"{ckpt.TEST_FAULT}\): '{re.escape(str(root / '.ckpt_0_batch2.partial'))}/"
            rf"rank-1\.json'")
    peer = rf"PeerFailed: checkpoint {re.escape(str(root / 'ckpt_0_batch2'))} was not written: " \
           rf"rank 1 failed with {full}"
    logs = tmp_path / "logs"
    steps = {rank: (logs / f"rank-{rank}.steps").read_text() for rank in range(2)}
    if asynchronous:
        # The save returned with the write under way; waiting for it raised its error.
        expected = {1: rf"save_checkpoint returned\nwait_for_checkpoint raised {full}\n",
                    0: rf"save_checkpoint returned\nwait_for_checkpoint raised {peer}\n"}
    else:
        expected = {1: rf"save_checkpoint raised {full}\n", 0: rf"save_checkpoint raised {peer}\n"}
    for rank in range(2):
        assert re.fullmatch(expected[rank], steps[rank]), (rank, steps[rank])
    # Nothing was published, and the folder the failed run made and never filled is gone.
    assert not root.exists(), os.listdir(root)


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """A ``saved-B.safetensors`` of :class:`~async_jobs.TwoSavesTrainer` as
    :func:`jobs.final_files` gives a checkpoint's tensors."""
    tensors = safetensors.torch.load_file(str(path))
    return {key: f"{t.dtype} {tuple(t.shape)}".encode() + t.numpy().tobytes()
            for key, t in tensors.items()}


def test_a_second_save_waits_for_the_first_and_each_holds_the_state_it_saw(tmp_path):
    Wrapper(CPU2, big(scheduler_loader=step_lr)).start(
        TwoSavesTrainer(job(tmp_path, epochs=1, save_every=0), first=2))
    root, logs = tmp_path / "checkpoint", tmp_path / "logs"
    # When the second save returned, the first was published: one write at a time, so the
    # host buffers that the second save copies into were no longer being written from.
    assert (logs / "after-second-save").read_text().splitlines() == ["ckpt_0_batch2"]
    assert ckpt.available(root, "ckpt") == ["ckpt_0_batch2", "ckpt_0_batch3"]
    for batch in (2, 3):
        folder = root / f"ckpt_0_batch{batch}"
        ckpt.verify(folder)
        held = {k: v for k, v in final_files(folder).items() if k != "scheduler.json"}
        assert held == tensor_bytes(logs / f"saved-{batch}.safetensors"), batch


def test_a_save_in_the_loop_writes_the_same_bytes_and_each_job_returns_once_published(
        tmp_path):
    """``async_checkpoint=False`` and the default write the same files, bit for bit; and
    ``Wrapper.start`` returns only once the last checkpoint is published, whole."""
    folders = {}
    for asynchronous in (True, False):
        path = tmp_path / f"async-{asynchronous}"
        metrics = Wrapper(CPU2, big(scheduler_loader=step_lr)).start(
            BlobTrainer(job(path, epochs=3, save_every=1, async_checkpoint=asynchronous)))
        assert metrics["epoch"] == 3
        root = path / "checkpoint"
        # Right after the job returned: the last checkpoint is in place and named latest.
        assert ckpt.latest(root, "ckpt") == "ckpt_3"
        assert sorted(os.listdir(root)) == ["ckpt_1", "ckpt_2", "ckpt_3", "ckpt_latest"]
        ckpt.verify(root / "ckpt_3")
        folders[asynchronous] = root
    for name in ("ckpt_1", "ckpt_2", "ckpt_3"):
        written = {asynchronous: root / name for asynchronous, root in folders.items()}
        assert final_files(written[True]) == final_files(written[False]), name
        # Every file alike, each rank's RNG states included, but for the identity of each run
        # (metrics.jsonl's run id, in state.json) and so the manifest's line for state.json.
        files = {a: sorted(p.name for p in folder.iterdir()) for a, folder in written.items()}
        assert files[True] == files[False], (name, files)
        for file in files[True]:
            read = {a: (folder / file).read_bytes() for a, folder in written.items()}
            if file == "state.json":
                read = {a: json.loads(data) for a, data in read.items()}
                assert read[True].pop("trackers") != read[False].pop("trackers")
            elif file == "manifest.json":
                read = {a: json.loads(data) for a, data in read.items()}
                for manifest in read.values():
                    del manifest["files"]["state.json"], manifest["hash"]
            assert read[True] == read[False], (name, file)
