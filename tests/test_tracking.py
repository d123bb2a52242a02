"""JobConfig.log_with: real tracker files, read back with each tracker's own reader, from jobs
of 2 real processes, paused and resumed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jobs import Blobs, BlobTrainer, PausingTrainer, artefacts, job

from ddpw import ConfigError, JobConfig, JobPaused, Platform, PlatformConfig, Wrapper

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
# 150 samples in batches of 8 on 2 ranks: 10 optimiser steps an epoch.
STEPS_PER_EPOCH = 10


def a_config():
    return artefacts(validation_set=Blobs(30, seed=2))


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def epoch_lines(folder) -> list[dict]:
    lines = (folder / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_tensorboard_has_every_step_and_epoch_of_a_paused_and_resumed_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Wrapper(CPU2, a_config()).start(BlobTrainer(job(
        whole, epochs=3, save_every=1, log_with="tensorboard", log_every_n_steps=4)))
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config()).start(PausingTrainer(job(
            parts, epochs=3, save_every=1, log_with="tensorboard", log_every_n_steps=4),
            at=(2, 5)))
    # Resumed from epoch 1 (step 10), before the pause (step 16): what the first attempt
    # logged past it (steps 12 and 16) is purged, so that no step appears twice.
    Wrapper(CPU2, a_config()).start(BlobTrainer(job(
        parts, start_at=1, epochs=3, save_every=1, log_with="tensorboard",
        log_every_n_steps=4)))

    expected = tensorboard_scalars(whole / "logs" / "ddpw")
    resumed = tensorboard_scalars(parts / "logs" / "ddpw")
    steps = list(range(4, 3 * STEPS_PER_EPOCH + 1, 4))
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    assert [s for s, _ in expected["step/loss"]] == steps
    assert [s for s, _ in expected["step/lr"]] == steps
    assert [s for s, _ in expected["val_accuracy"]] == epoch_ends
    # The epoch metrics are those of metrics.jsonl, at each epoch's last step.
    jsonl = epoch_lines(whole)
    assert [v for _, v in expected["loss"]] == pytest.approx([e["loss"] for e in jsonl])
    assert [v for _, v in expected["val_loss"]] == pytest.approx([e["val_loss"] for e in jsonl])
    # metrics.jsonl: each line names its run, which a resumed run goes on with, and the
    # checkpoint its part of the run started from.
    lines = epoch_lines(parts)
    assert [e["epoch"] for e in lines] == [1, 2, 3]
    assert len({e["run"] for e in lines}) == 1 and lines[0]["run"] != jsonl[0]["run"]
    assert lines[0]["resumed_from"] is None
    # The checkpoint the second part started from: the pause's, or epoch 1's.
    assert re.fullmatch(r"ckpt_1(_batch\d+)?", lines[1]["resumed_from"])
    assert lines[2]["resumed_from"] == lines[1]["resumed_from"]
    # The goodput summary, at the last step, before the trackers closed: of both attempts.
    assert resumed["goodput/attempts"] == [(3 * STEPS_PER_EPOCH, 2)]
    assert expected["goodput/attempts"] == [(3 * STEPS_PER_EPOCH, 1)]
    assert sum(resumed[f"goodput/{part}_s"][0][1] for part in (
        "startup", "training", "validation", "checkpoint", "restore", "other", "lost",
        "waiting")) == pytest.approx(resumed["goodput/wall_s"][0][1], rel=1e-6)
    assert resumed["goodput/lost_steps"][0][1] > 0  # went back from the pause to epoch 1
    # Resumed: each step once, in order, with the uninterrupted run's values (the resume is
    # exact); samples per second is a wall-clock rate, and only its steps are compared.
    assert set(resumed) == set(expected)
    for tag, points in expected.items():
        if tag == "step/samples_per_s" or tag.startswith("goodput/"):
            assert [s for s, _ in resumed[tag]] == [s for s, _ in points]
            assert all(v > 0 for _, v in resumed[tag])
        else:
            assert resumed[tag] == points, tag
    # Two attempts wrote to the folder: the first logged steps 12 and 16 too.
    assert len(list((parts / "logs" / "ddpw").glob("events.out.tfevents.*"))) == 2
    # The configs are hyper-parameters, logged once: by the run that started from scratch.
    (stored,) = (parts / "logs" / "ddpw").glob("*/hparams.yml")
    text = stored.read_text()
    for line in ("job.epochs: 3", "platform.n_procs: 2", "artefacts.batch_size: 8",
                 "artefacts.model: Net", "artefacts.train_set: Blobs(len=150)"):
        assert line in text


def wandb_history(path) -> list[dict]:
    """The history rows of a W&B run file: W&B's own protobuf records, framed as LevelDB's log
    (32 KiB blocks of chunks with a 7-byte header: CRC, length, type), after a 7-byte file
    header. (wandb no longer ships a Python reader.)"""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:
            offset += room
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        chunk, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def test_mlflow_and_wandb_go_on_in_the_same_run_after_a_pause(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = ("mlflow", "wandb")
    with pytest.raises(JobPaused):
        Wrapper(CPU2, a_config()).start(PausingTrainer(job(
            tmp_path, epochs=2, save_every=1, log_with=trackers, log_every_n_steps=5),
            at=(2, 3)))
    Wrapper(CPU2, a_config()).start(BlobTrainer(job(
        tmp_path, start_at="latest", epochs=2, save_every=1, log_with=trackers,
        log_every_n_steps=5)))

    # Paused at step 14: the first attempt logged steps 5 and 10, the resumed one goes on.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpw")
    (run,) = client.search_runs([experiment.experiment_id])
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                     "step/loss")]
    assert [step for step, _ in history] == [5, 10, 15, 20]
    epochs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert [step for step, _ in epochs] == [10, 20]
    assert [v for _, v in epochs] == pytest.approx([e["val_loss"] for e in epoch_lines(tmp_path)])
    assert run.data.params["job.epochs"] == "2"

    # Offline, W&B writes each attempt's folder under the training logs, named by the run's
    # id: the resumed attempt's is the first's id.
    first, second = sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    run_id = first.name.rsplit("-", 1)[1]
    assert second.name.endswith(f"-{run_id}")
    (records,) = first.glob("run-*.wandb")
    (more,) = second.glob("run-*.wandb")
    assert records.name == more.name == f"run-{run_id}.wandb"
    history = wandb_history(records) + wandb_history(more)
    assert [h["_step"] for h in history if "step/loss" in h] == [5, 10, 15, 20]
    assert [h["_step"] for h in history if "val_loss" in h] == [10, 20]


def test_inside_torchrun_the_trackers_end_and_the_process_group_stays(tmp_path):
    """In place, the caller's launch owns the process group: closing the trackers must leave it
    up for the results' gather, and for the caller's own collectives after the job; and the
    process, which goes on, keeps no copy of the checkpoints' state."""
    script = tmp_path / "inplace.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from pathlib import Path
        import torch
        import torch.distributed as dist
        from jobs import Blobs, BlobTrainer, artefacts, job
        from ddpw import Platform, PlatformConfig, Wrapper

        p = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
        a = artefacts(validation_set=Blobs(30, seed=2))
        trainer = BlobTrainer(job(Path("."), epochs=2, save_every=1, log_with="tensorboard"))
        metrics = Wrapper(p, a).start(trainer)
        total = torch.ones(1)
        dist.all_reduce(total)  # the caller's group is still there
        # The host buffers that staged this rank's share of each checkpoint, still held?
        held = len(trainer._ddpw.checkpoints._buffers)
        Path(f"after-{{dist.get_rank()}}.txt").write_text(
            f"{{int(total.item())}} {{metrics['epoch']}} {{held}}")
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # One file a rank (their prints would interleave): the sum over 2 ranks, the last epoch,
    # and no staging buffers kept once start() returned.
    assert [(tmp_path / f"after-{r}.txt").read_text() for r in (0, 1)] == ["2 2 0"] * 2
    assert [s for s, _ in tensorboard_scalars(tmp_path / "logs" / "ddpw")["val_loss"]] == [
        STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_a_tracker_that_is_not_installed_is_refused_before_launch(tmp_path):
    j_config = job(tmp_path, log_with=("tensorboard", "aim"))
    with pytest.raises(ConfigError, match=r"JobConfig\.log_with=\('tensorboard', 'aim'\): aim "
                                          r"is not installed here; pip install aim"):
        Wrapper(CPU2, a_config()).start(BlobTrainer(j_config))
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("value", ["tensorbord", (), ("wandb", 3), 7])
def test_an_unknown_tracker_is_refused(value):
    with pytest.raises(ConfigError, match=r"JobConfig\.log_with=.* is not valid: None, or one "
                                          r"or more of 'tensorboard', 'wandb', 'mlflow'"):
        JobConfig(log_with=value)
