"""Bad input is refused before any process starts; failing ranks end the whole job."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from jobs import Blobs, BlobTrainer, Net, artefacts, job, wait_for_ranks

import ddpw.launcher
from ddpw import (
    ArtefactsConfig,
    ConfigError,
    JobConfig,
    JobMode,
    Platform,
    PlatformConfig,
    Trainer,
    WorkerError,
    Wrapper,
    world,
)
from ddpw.contract import step_values

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)


@pytest.fixture
def no_launch(monkeypatch):
    """Make any attempt to start processes fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(ddpw.launcher, "_run", refuse)


def test_the_seed_example_on_a_machine_without_cuda_says_so(tmp_path, no_launch):
    p_config = PlatformConfig(platform=Platform.GPU, n_gpus=4, cpus_per_task=2)
    a_config = artefacts()
    j_config = JobConfig(job_type=JobMode.TRAIN, start_at=0, epochs=50, save_every=5)
    with pytest.raises(ConfigError, match=r"Platform\.GPU needs CUDA.*Platform\.CPU"):
        Wrapper(p_config, a_config).start(BlobTrainer(j_config))


def test_missing_checkpoint_lists_those_that_exist(tmp_path, no_launch):
    (tmp_path / "checkpoint").mkdir()
    Wrapper(CPU1, artefacts()).start(BlobTrainer(job(tmp_path, epochs=2, save_every=1)))
    missing = r"start_at=7: no checkpoint .*ckpt_7.*: ckpt_1, ckpt_2\."
    with pytest.raises(ConfigError, match=missing):
        Wrapper(CPU2, artefacts()).start(BlobTrainer(job(tmp_path, mode=JobMode.RESUME,
                                                         start_at=7, epochs=9)))


def test_a_checkpoint_that_does_not_fit_the_model_names_the_keys(tmp_path, no_launch):
    Wrapper(CPU1, artefacts()).start(BlobTrainer(job(tmp_path, epochs=1, save_every=1)))
    with pytest.raises(ConfigError, match=r"does not fit the model \(Sequential\): missing: "
                                          r"0\.weight, 0\.bias; unexpected: body\.0\.bias"):
        other = artefacts(model=torch.nn.Sequential(torch.nn.Linear(8, 3)))
        Wrapper(CPU2, other).start(BlobTrainer(job(tmp_path, mode=JobMode.EVALUATE, start_at=1)))
    shapes = r"body\.0\.weight is \(16, 8\) in the checkpoint, \(32, 8\) in the model"
    with pytest.raises(ConfigError, match=shapes):
        wider = artefacts(model=Net(hidden=32))
        Wrapper(CPU2, wider).start(BlobTrainer(job(tmp_path, mode=JobMode.EVALUATE, start_at=1)))


@pytest.mark.parametrize(("overrides", "mode", "message"), [
    ({"train_set": None}, JobMode.TRAIN, r"ArtefactsConfig\.train_set=None: JobMode\.TRAIN"),
    ({"test_set": None}, JobMode.EVALUATE, r"ArtefactsConfig\.test_set=None: JobMode\.EVALUATE"),
    ({"model": None}, JobMode.TRAIN, r"ArtefactsConfig\.model=None"),
    ({"optimiser_loader": None}, JobMode.TRAIN, r"ArtefactsConfig\.optimiser_loader=None"),
])
def test_missing_artefacts_are_named(tmp_path, no_launch, overrides, mode, message):
    with pytest.raises(ConfigError, match=message):
        Wrapper(CPU2, artefacts(**overrides)).start(BlobTrainer(job(tmp_path, mode=mode)))


class NoSteps(Trainer):
    """A Trainer that defines neither step."""


class TrainOnly(NoSteps):
    def train_step(self, batch):
        return BlobTrainer.train_step(self, batch)


@pytest.mark.parametrize(("target", "overrides", "mode", "message"), [
    (NoSteps, {}, JobMode.TRAIN, r"^NoSteps defines no train_step\(batch\), which "
                                 r"JobMode\.TRAIN calls for every batch: define it to return the "
                                 r"loss as a scalar tensor with a graph"),
    (TrainOnly, {"validation_set": Blobs(30)}, JobMode.TRAIN,
     r"^TrainOnly defines no evaluate_step\(batch\), with which "
     r"ArtefactsConfig\.validation_set is evaluated after the epochs: .* or leave "
     r"validation_set=None\.$"),
    (TrainOnly, {}, JobMode.EVALUATE, r"^TrainOnly defines no evaluate_step\(batch\), with "
                                      r"which JobMode\.EVALUATE evaluates "
                                      r"ArtefactsConfig\.test_set"),
])
def test_a_trainer_without_the_steps_its_job_calls_is_refused(tmp_path, no_launch, target,
                                                              overrides, mode, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Wrapper(CPU2, artefacts(**overrides)).start(target(job(tmp_path, mode=mode)))
    assert "\n" not in str(caught.value)
    # Without a validation set, training needs no evaluate_step.
    assert TrainOnly(job(tmp_path)).check(CPU2, artefacts()) is None


def test_a_trainer_class_is_refused_with_how_to_start_an_instance(no_launch):
    with pytest.raises(ConfigError, match=r"^Wrapper\.start\(BlobTrainer\): the class, not a "
                                          r"Trainer; start an instance: "
                                          r"Wrapper\.start\(BlobTrainer\(j_config\)\)\.$"):
        Wrapper(CPU2, artefacts()).start(BlobTrainer)


def test_config_errors_at_construction_name_the_field():
    with pytest.raises(ConfigError, match=r"JobConfig\.epochs=2 is not valid: at least start_at=3"):
        JobConfig(start_at=3, epochs=2)
    with pytest.raises(ConfigError, match=r"JobConfig\.save_every=-1"):
        JobConfig(save_every=-1)
    with pytest.raises(ConfigError, match=r"ArtefactsConfig\.batch_size=0"):
        ArtefactsConfig(batch_size=0)


def test_a_job_that_cannot_be_shipped_names_the_object(tmp_path, no_launch):
    trainer = BlobTrainer(job(tmp_path))
    trainer.lock = threading.Lock()
    with pytest.raises(ConfigError, match=r"cannot send BlobTrainer\.lock \(lock\)"):
        Wrapper(CPU2, artefacts()).start(trainer)
    with pytest.raises(ConfigError, match=r"cannot send argument 0 of start\(\)"):
        Wrapper(CPU2).start(print, (x for x in range(3)))


def die_on_rank_one(finished: str) -> int:
    w = world()
    if w.global_rank == 1:
        time.sleep(0.5)
        os._exit(3)
    # Rank 0 waits for a peer that never arrives, in a collective and then (once gloo gives up
    # on the peer) for a minute: the launcher must end it rather than wait.
    with contextlib.suppress(Exception):
        w.accelerator.wait_for_everyone()
    time.sleep(60)
    Path(finished).touch()
    return 0


def test_a_rank_that_dies_ends_the_job_with_its_status(tmp_path, no_leftover_processes):
    finished = tmp_path / "rank-0-finished"
    with pytest.raises(WorkerError, match=r"rank 1 of 2 died \(exit status 3\)") as caught:
        Wrapper(CPU2).start(die_on_rank_one, str(finished))
    assert caught.value.rank == 1 and caught.value.status == 3
    # With no traceback of its own, the error tells what the agent saw: rank 1's end, and its
    # own ending of rank 0.
    assert "failed (exitcode: 3) local_rank: 1" in caught.value.details
    assert re.search(r"Sending process \d+ closing signal SIGTERM", caught.value.details)
    assert not finished.exists(), "the job ended only when rank 0 had finished"


#: A user's script, without the ``__main__`` guard: a Trainer of its own, whose rank 1 raises
#: in ``train_step`` while rank 0 waits for it in the backward pass's all-reduce (and loses its
#: peer); or a function that raises on both ranks.
USERS_SCRIPT = """
import signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from jobs import BlobTrainer, artefacts, job
from ddpw import Platform, PlatformConfig, Wrapper, world

class Unhappy(BlobTrainer):
    def train_step(self, batch):
        if self.global_rank == 1 and self.batch == 2:
            raise ValueError("rank one is unhappy")
        return super().train_step(batch)

def both_unhappy():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the agent ends neither before it raises
    world().accelerator.wait_for_everyone()
    raise ValueError(f"rank {{world().global_rank}} is unhappy")

cpu2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
if sys.argv[1] == "trainer":
    Wrapper(cpu2, artefacts()).start(Unhappy(job(Path("."))))
else:
    Wrapper(cpu2).start(both_unhappy)
"""


def outline(console: str) -> list[str]:
    """The lines of a console that are not a traceback's frames (which Python indents)."""
    return [line for line in console.splitlines() if not line.startswith("  ")]


@pytest.mark.parametrize("target", ["trainer", "function"])
def test_on_failure_the_console_shows_the_first_traceback_once_in_the_users_own_code(tmp_path,
                                                                                     target):
    script = tmp_path / "users_script.py"
    script.write_text(USERS_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = subprocess.run([sys.executable, str(script), target], cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 1, out.stderr
    console = out.stdout + out.stderr
    # The whole console: the caller's traceback up to the WorkerError, whose one line names
    # every rank that failed, then the traceback of the rank that failed first, and no more:
    # no rank's own copy of it, no line of torchrun's agent, no traceback of a rank that only
    # lost its peer.
    lines = outline(console)
    assert len(lines) == 5 and lines[0] == lines[3] == "Traceback (most recent call last):"
    assert lines[2] == "", console
    said, last = lines[1], lines[4]
    if target == "trainer":
        assert re.fullmatch(r"ddpw\.errors\.WorkerError: rank 1 of 2 raised an exception; rank 0 "
                            r"lost a peer \(Connection (closed|reset) by peer"
                            r"( \[127\.0\.0\.1\])?\)", said), console
        raised, in_function = 'raise ValueError("rank one is unhappy")', "train_step"
        assert last == "ValueError: rank one is unhappy"
    else:
        found = re.fullmatch(r"ddpw\.errors\.WorkerError: rank ([01]) of 2 raised an exception "
                             r"first; rank ([01]) raised too \(ValueError: rank \2 is unhappy\)",
                             said)
        assert found and found[1] != found[2], console
        raised = 'raise ValueError(f"rank {world().global_rank} is unhappy")'
        in_function = "both_unhappy"
        assert last == f"ValueError: rank {found[1]} is unhappy"
    # The user's own code, by path, line and text, though it travelled to the ranks by value.
    line = [text.strip() for text in script.read_text().splitlines()].index(raised) + 1
    assert console.splitlines()[-3:-1] == [f'  File "{script}", line {line}, in {in_function}',
                                           f"    {raised}"], console


def test_evaluate_step_must_return_per_sample_values(tmp_path):
    class Averaging(BlobTrainer):
        def evaluate_step(self, batch):
            return {"loss": super().evaluate_step(batch)["loss"].mean()}

    with pytest.raises(WorkerError, match="rank 0 of 1 raised") as caught:
        Wrapper(CPU1, artefacts()).start(Averaging(job(tmp_path, mode=JobMode.EVALUATE)))
    assert isinstance(caught.value.__cause__, TypeError)
    assert re.search(r"'loss' of shape \(\).*one value per sample", caught.value.details)


def test_train_step_must_return_a_loss_with_a_graph(tmp_path, no_leftover_processes):
    class Itemising(BlobTrainer):
        def train_step(self, batch):
            return super().train_step(batch)["loss"].item()

    with pytest.raises(WorkerError, match="raised") as caught:
        Wrapper(CPU2, artefacts()).start(Itemising(job(tmp_path)))
    # The checkpoint folder that the job made (where every rank checked that it sees the
    # main rank's files), and never saved into, is gone.
    assert not (tmp_path / "checkpoint").exists() and tmp_path.exists()
    assert re.search(r"TypeError: Itemising\.train_step returned the float \d\.\d+: it must "
                     r"return the loss as a scalar tensor with a graph \(not loss\.item\(\)\), "
                     r"or a dict holding one under 'loss'\.$", caught.value.details, re.M)


GRAPH = torch.ones(2, requires_grad=True).sum()


@pytest.mark.parametrize(("output", "message"), [
    (3, r"returned the int 3: it must return the loss as a scalar tensor with a graph"),
    ({"loss": 0.5}, r"returned 'loss' as the float 0\.5: it must return the loss as"),
    (torch.tensor(0.5), r"returned a loss without a graph \(requires_grad=False: computed under "
                        r"torch\.no_grad\(\) or detached\)"),
    (torch.ones(4, requires_grad=True), r"returned a tensor of shape \(4,\): it must return"),
    ({"accuracy": GRAPH}, r"returned a dict without 'loss' \(keys: accuracy\)"),
    ({"loss": GRAPH, "accuracy": 0.75}, r"returned 'accuracy' as the float 0\.75: each value "
                                        r"must be a tensor of one value"),
])
def test_what_train_step_returned_is_named(output, message):
    with pytest.raises(TypeError, match=r"^Net\.train_step " + message):
        step_values(output, "Net")
    assert step_values({"loss": GRAPH, "n": torch.ones(1)}, "Net")["loss"] is GRAPH
    assert step_values(GRAPH, "Net") == {"loss": GRAPH}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_caller_ends_every_process_of_the_job(tmp_path, sig):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from pathlib import Path
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def wait():
            Path(f"ready-{world().global_rank}").write_text(str(os.getpid()))
            time.sleep(120)

        Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2)).start(wait)
    """))
    caller = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                              stderr=subprocess.PIPE)
    workers = wait_for_ranks(tmp_path, caller)
    caller.send_signal(sig)
    _, err = caller.communicate(timeout=120)  # a bound for a busy machine, not a speed
    assert caller.returncode != 0
    expected = "KeyboardInterrupt" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert expected in err
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
