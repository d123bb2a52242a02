"""Sweeps (ddpw.sweep): the grid and its refusals as data, a local sweep of the CLI and of
Wrapper.sweep run for real, and a SLURM job array on the real two-node cluster."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs import SlowTrainer, artefacts, final_files, job, step_lr

from ddpw import ConfigError, Platform, PlatformConfig, WorkerError, Wrapper, world
from ddpw.sweep import folder as sweep_folder
from ddpw.sweep import grid
from ddpw.sweep.array import chunks, max_array_size
from ddpw.sweep.local import gpu_slots

TESTS = Path(__file__).resolve().parent
POINT = str(TESTS / "scripts" / "sweep_point.py")
LAUNCH = [sys.executable, "-m", "ddpw"]


@pytest.mark.parametrize(("options", "said"), [
    (["lr"], "--sweep 'lr': needs NAME=V1,V2,..."),
    (["lr="], "--sweep 'lr=': needs one value or more"),
    (["lr=1,,2"], "none of them empty"),
    (["task=1"], "other than 'task'"),
    (["lr=1", "lr=2"], "--sweep lr= is given twice: give its values in one option, --sweep "
                       "lr=1,2."),
])
def test_bad_sweep_options_are_refused(options, said):
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace("[", r"\[")
                       .replace(".", r"\.")):
        grid.parse(options)


def test_the_grid_its_placeholders_and_its_refusals():
    axes = grid.parse(["lr=0.1,0.01", "seed=0,1,2"])
    points = grid.points(axes)
    assert points[:2] == [{"lr": "0.1", "seed": "0"}, {"lr": "0.1", "seed": "1"}]
    assert len(points) == 6
    assert grid.task_name(4, points[4]) == "4-lr_0.01-seed_1"
    assert grid.fill(["--lr={lr}", "ckpt/{task}", "{{lr}}"], points[4], "4-lr_0.01-seed_1") == \
        ["--lr=0.01", "ckpt/4-lr_0.01-seed_1", "{{lr}}"]
    with pytest.raises(ConfigError, match=r"use \{wd\}, and no --sweep wd=\.\.\. gives it"):
        grid.check_script_args(["--wd", "{wd}"], axes)
    assert grid.check_script_args(["--lr", "{lr}"], axes) == [
        "--sweep seed=... is used by no argument of the script (no {seed}): its points run the "
        "same command."]
    with pytest.raises(ConfigError, match=r"has 300 points \(3 \(a\) x 100 \(b\)\), more than "
                                          r"the limit of 256: give --max-points 300"):
        grid.points({"a": [1, 2, 3], "b": list(range(100))})
    assert len(grid.points({"a": [1, 2, 3], "b": list(range(100))}, max_points=300)) == 300
    # Two points that would write to one checkpoint folder, refused with the fix.
    args = ["--checkpoint-dir", "ckpts/{lr}", "--epochs", "3"]
    assert grid.checkpoint_folders(args) == [("--checkpoint-dir", "ckpts/{lr}")]
    folders = {grid.task_name(i, p): dict(grid.checkpoint_folders(grid.fill(args, p, "t")))[
        "--checkpoint-dir"] for i, p in enumerate(points)}
    with pytest.raises(ConfigError, match=r"points 0-lr_0\.1-seed_0 and 1-lr_0\.1-seed_1 would "
                                          r"both write their checkpoints to 'ckpts/0\.1' .* put "
                                          r"\{task\}"):
        grid.check_distinct(folders, "the script's --checkpoint-dir")


def test_concurrent_gpu_points_get_disjoint_gpus_and_arrays_split_at_max_array_size():
    assert gpu_slots(1, 4, env={}, cuda_devices=4) == ["0", "1", "2", "3"]
    assert gpu_slots(2, 4, env={}, cuda_devices=4) == ["0,1", "2,3"]  # two at once at most
    assert gpu_slots(2, 1, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ["4,5"]
    assert gpu_slots(0, 3, env={}) == [None, None, None]
    with pytest.raises(ConfigError, match=r"asks for 2 GPU\(s\).* and 1 are visible"):
        gpu_slots(2, 1, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert chunks(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]


def test_two_points_claiming_one_checkpoint_folder_are_refused(tmp_path):
    sweep_folder.write(tmp_path, {"task": "0-a_1", "params": {}, "state": "running"})
    sweep_folder.write(tmp_path, {"task": "1-a_2", "params": {}, "state": "running"})
    sweep_folder.claim(tmp_path, tmp_path / "ckpt", "0-a_1")
    sweep_folder.claim(tmp_path, tmp_path / "ckpt", "0-a_1")  # every rank of the point claims it
    with pytest.raises(ConfigError, match=r"points 0-a_1 and 1-a_2 both write their checkpoints "
                                          r"to .*ckpt \(JobConfig\.checkpoint_path\)"):
        sweep_folder.claim(tmp_path, tmp_path / "ckpt", "1-a_2")
    assert sweep_folder.read(tmp_path, "0-a_1")["checkpoint_folder"] == str(tmp_path / "ckpt")


def test_ddpw_launch_refuses_a_bad_sweep_before_anything_starts(tmp_path):
    done = subprocess.run([*LAUNCH, "--platform", "cpu", "--n-procs", "1", "--sweep", "lr=1,2",
                           POINT, "--out", "o/{lr}", "--checkpoint-dir", "same"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # A checkpoint-like option that is the same for every point.
    assert done.returncode == 2 and "would both write their checkpoints to 'same'" in \
        done.stderr, done.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "o").exists()


def test_a_local_sweep_runs_two_at_a_time_names_its_failure_and_reruns_only_it(tmp_path):
    (tmp_path / "fail-3").touch()
    command = [*LAUNCH, "--platform", "cpu", "--n-procs", "1", "--sweep", "x=1,2,3",
               "--parallelism", "2", POINT, "--out", "out/{task}", "--fail", "fail-{x}",
               "--sleep", "1", "--checkpoint-dir", "ckpt/{x}"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr
    assert "[ddpw] sweep points 2-x_3 failed" in first.stderr
    table = first.stderr[first.stderr.index("point  x"):].splitlines()
    assert [line.split()[:4] for line in table[1:4]] == [
        ["0-x_1", "1", "done", "exit"], ["1-x_2", "2", "done", "exit"],
        ["2-x_3", "3", "failed", "exit"]], table
    notes = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/0.json")}
    assert set(notes) == {"0-x_1", "1-x_2"}
    assert notes["0-x_1"]["argv"][:2] == ["--out", "out/0-x_1"]
    # The first two ran at once.
    assert notes["0-x_1"]["began"] < notes["1-x_2"]["ended"]
    assert notes["1-x_2"]["began"] < notes["0-x_1"]["ended"]
    (sweep,) = (tmp_path / "logs" / "console_logs" / "sweeps").iterdir()
    record = json.loads((sweep / "points" / "2-x_3" / "point.json").read_text())
    assert record["params"] == {"x": "3"} and record["state"] == "failed"
    assert record["checkpoint_folder"] == str(tmp_path / "ckpt" / "3")
    assert record["log_folder"] == str(sweep / "points" / "2-x_3" / "logs")
    assert record["result"]["exit_status"] == 3
    assert "failing on purpose: fail-3 exists" in record["result"]["last_lines"]

    (tmp_path / "fail-3").unlink()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "3 points in" in again.stderr and ": 1 to run" in again.stderr
    assert "sweep point 0-x_1: running" not in again.stderr
    assert json.loads((tmp_path / "out" / "0-x_1" / "0.json").read_text()) == notes["0-x_1"]
    assert json.loads((sweep / "points" / "2-x_3" / "point.json").read_text())["state"] == "done"


def scaled(a: int, b: int) -> tuple[int, int, int]:
    return world().global_rank, world().world_size, 10 * a + b


def fails_on_two(a: int) -> int:
    if a == 2:
        raise ValueError("two is unwelcome")
    return a


def test_wrapper_sweep_refuses_a_bad_grid_and_names_a_failed_point(tmp_path, monkeypatch):
    # Its runs that succeed, results in grid order, are the guide's snippet's
    # (test_docs_snippets).
    monkeypatch.chdir(tmp_path)
    w = Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=1, verbose=False))
    with pytest.raises(WorkerError, match=r"sweep points 1-a_2 failed \(their output in .*"
                                          r"console\.log\); the others are done"):
        w.sweep(fails_on_two, {"a": [1, 2]}, parallelism=2)
    (sweep,) = (tmp_path / "logs" / "console_logs" / "sweeps").iterdir()
    assert sweep_folder.read(sweep, "0-a_1")["result"] == [1]
    failed = sweep_folder.read(sweep, "1-a_2")
    assert failed["state"] == "failed", failed
    assert failed["result"]["error"] == "WorkerError: rank 0 of 1 raised an exception"
    assert failed["result"]["last_lines"][-1] == "ValueError: two is unwelcome"
    table = list(sweep_folder.table([sweep_folder.read(sweep, t) for t in ("0-a_1", "1-a_2")]))
    assert table[2].split() == ["1-a_2", "2", "failed", "ValueError:", "two", "is", "unwelcome"]
    console = (sweep / "points" / "1-a_2" / "console.log").read_text()
    assert "ValueError: two is unwelcome" in console
    shutil.rmtree(tmp_path / "logs")
    with pytest.raises(ConfigError, match=r"parallelism=0\): needs a whole number"):
        w.sweep(scaled, {"a": [1]}, parallelism=0)
    with pytest.raises(ConfigError, match=r"grid 'a': needs a list of one value or more"):
        w.sweep(scaled, {"a": 1})
    with pytest.raises(ConfigError, match=r"grid name 'a-b': needs a Python identifier"):
        w.sweep(scaled, {"a-b": [1]})
    assert not (tmp_path / "logs").exists()


# --- SLURM ----------------------------------------------------------------------------------------

SLURM_LAUNCH = [*LAUNCH, "--platform", "slurm", "--partition", "debug", "--timeout-min", "5",
                "--n-gpus", "0", "--n-nodes", "2", "--n-procs", "1"]


def test_ddpw_launch_dry_run_of_a_slurm_sweep_shows_each_points_plan_and_the_array(tmp_path):
    (tmp_path / "p.py").touch()
    done = subprocess.run([*SLURM_LAUNCH, "--dry-run", "--sweep", "a=1,2", "--sweep", "b=3,4",
                           "--parallelism", "1", "p.py", "--a", "{a}", "--b", "{b}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert [point["command"][-4:] for point in shown["points"]] == [
        ["--a", a, "--b", b] for a in "12" for b in "34"]
    assert shown["points"][0]["world_size"] == 2
    (sbatch,) = shown["sbatch"]
    assert "#SBATCH --array=0-3%1" in sbatch and "#SBATCH --nodes=2" in sbatch
    assert not (tmp_path / "logs").exists()


@pytest.fixture
def cluster(slurm, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)


def test_a_slurm_sweep_is_one_array_run_one_task_at_a_time_and_reruns_only_what_failed(
        cluster, tmp_path):
    (tmp_path / "fail-24").touch()
    command = [*SLURM_LAUNCH, "--sweep", "a=1,2", "--sweep", "b=3,4", "--parallelism", "1",
               POINT, "--out", str(tmp_path / "out" / "{task}"), "--sleep", "0",
               "--fail", "fail-{a}{b}", "{a}{b}"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "[ddpw] sweep points 3-a_2-b_4 failed" in first.stderr, \
        first.stderr
    (sweep,) = (tmp_path / "logs" / "console_logs" / "sweeps").iterdir()
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("points/*/point.json"))]
    assert [r["state"] for r in records] == ["done", "done", "done", "failed"]
    # One array of 4 tasks.
    arrays = {r["job_id"].split("_")[0] for r in records}
    assert len(arrays) == 1 and sorted(r["job_id"].split("_")[1] for r in records) == \
        ["0", "1", "2", "3"], records
    spans = []
    for record in records[:3]:
        notes = [json.loads((tmp_path / "out" / record["task"] / f"{rank}.json").read_text())
                 for rank in (0, 1)]
        # A 2-process world across both nodes, with its placeholders filled.
        assert {note["world"] for note in notes} == {2}
        a, b = record["params"]["a"], record["params"]["b"]
        assert notes[0]["argv"][-1] == f"{a}{b}", notes[0]
        spans.append((min(n["began"] for n in notes), max(n["ended"] for n in notes)))
    spans.sort()
    assert all(end <= later for (_, end), (later, _) in itertools.pairwise(spans)), spans
    assert max_array_size() >= 4

    # Again, once the cause is gone: the failed point alone is submitted; without waiting,
    # the task's node 0 records its end itself.
    (tmp_path / "fail-24").unlink()
    again = subprocess.run([*command[:3], "--no-wait", *command[3:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and ": 1 to run" in again.stderr, again.stderr
    submitted = json.loads(again.stdout)
    assert submitted["sweep_folder"] == str(sweep) and list(submitted["jobs"]) == ["3-a_2-b_4"]
    deadline = time.monotonic() + 120
    while sweep_folder.read(sweep, "3-a_2-b_4")["state"] != "done":
        assert time.monotonic() < deadline, sweep_folder.read(sweep, "3-a_2-b_4")
        time.sleep(0.2)
    rerun = [json.loads(p.read_text()) for p in sorted(sweep.glob("points/*/point.json"))]
    assert [r["job_id"] for r in rerun[:3]] == [r["job_id"] for r in records[:3]]
    assert rerun[3]["state"] == "done" and rerun[3]["job_id"] != records[3]["job_id"]
    # And again: every point is done, nothing is submitted.
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and ": 0 to run" in done.stderr, done.stderr
    assert done.stderr.count(" done ") == 4, done.stderr


def train_point(root: str, n: int) -> dict[str, float]:
    """A point of a Trainer sweep: trains in place, in the point's world, in ROOT/nN."""
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    return Wrapper(p_config, artefacts(n, scheduler_loader=step_lr)).start(
        SlowTrainer(job(Path(root) / f"n{n}", epochs=2, save_every=2)))


def test_a_preempted_task_of_a_trainer_sweep_requeues_and_resumes_bitwise(cluster, tmp_path):
    p_config = PlatformConfig(platform=Platform.SLURM, n_gpus=0, n_procs=2, partition="debug",
                              timeout_min=20, verbose=False)
    fn = functools.partial(train_point, str(tmp_path / "swept"))
    submissions = Wrapper(p_config, wait=False).sweep(fn, {"n": [150, 160]}, parallelism=2)
    with pytest.raises(ConfigError, match=r"is running points 0-n_150, 1-n_160 \(in another "
                                          r"run, or a SLURM array still queued\)"):
        Wrapper(p_config, wait=False).sweep(fn, {"n": [150, 160]})
    deadline = time.monotonic() + 180
    while not (tmp_path / "swept" / "n150" / "mid-epoch").exists():
        assert time.monotonic() < deadline and not submissions[0].done()
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", submissions[0].job_id], check=True)
    swept = [submission.wait() for submission in submissions]
    (sweep,) = (tmp_path / "logs" / "console_logs" / "sweeps").iterdir()
    records = [sweep_folder.read(sweep, task) for task in ("0-n_150", "1-n_160")]
    assert [(r["state"], r["requeued"]) for r in records] == [("done", 1), ("done", 0)], records
    assert records[0]["checkpoint_folder"] == str(tmp_path / "swept" / "n150" / "checkpoint")
    console = next(sweep.glob(f"slurm/{submissions[0].job_id}_0_log.out")).read_text()
    assert "[ddpw] requeued SLURM job" in console and "attempt 2: resuming from" in console
    assert [per_rank[0]["epoch"] for per_rank in swept] == [2, 2]
    # The preempted point alone, here, without a stop: the same checkpoint, bit for bit.
    assert train_point(str(tmp_path / "alone"), 150) == swept[0][0]
    assert final_files(tmp_path / "swept" / "n150" / "checkpoint" / "ckpt_2") == \
        final_files(tmp_path / "alone" / "n150" / "checkpoint" / "ckpt_2")
