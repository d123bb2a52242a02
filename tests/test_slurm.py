"""Jobs submitted to the real two-node SLURM cluster that scripts/slurm-cluster starts."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from jobs import (
    Blocks,
    InspectingTrainer,
    ShardInspectingTrainer,
    SlowTrainer,
    artefacts,
    final_files,
    goodput_of,
    job,
    shard_files,
    step_lr,
)

from ddpw import (
    ConfigError,
    JobHung,
    Platform,
    PlatformConfig,
    WorkerError,
    Wrapper,
    restartable,
    world,
)
from ddpw import checkpoint as ckpt
from ddpw.errors import HUNG_EXIT_STATUS
from ddpw.plan import rendezvous_port

TESTS = Path(__file__).resolve().parent
SLURM_CPU = {"platform": Platform.SLURM, "n_gpus": 0, "partition": "debug", "timeout_min": 5,
             "verbose": False}
EXACT = {"scheduler_loader": step_lr}
ACCUMULATE = {"gradient_accumulation_steps": 2}


@pytest.fixture
def cluster(slurm, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)  # the job folders go under ./logs/console_logs


def job_folders() -> list[Path]:
    """The job folders that ddpw made for functions (under ./logs/console_logs)."""
    return sorted(Path("logs", "console_logs").glob("*"))


def where(offset: int) -> tuple[int, int, int, float]:
    w = world()
    total = w.accelerator.reduce(torch.tensor(float(w.global_rank + offset)), reduction="sum")
    return w.global_rank, w.node_rank, w.world_size, float(total)


def test_a_trainer_runs_two_processes_on_one_node(cluster, tmp_path):
    p_config = PlatformConfig(platform=Platform.SLURM, n_gpus=0, n_procs=2, partition="debug",
                              timeout_min=5, verbose=False)
    result = Wrapper(p_config, artefacts()).start(InspectingTrainer(job(tmp_path, epochs=1)))
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert torch.equal(result["params"][0], result["params"][1])


def test_fsdp_on_two_nodes_ends_bitwise_equal_to_one_node_of_two_processes(cluster, tmp_path):
    sharded = {"strategy": "fsdp", "verbose": False}
    runs = []
    for where, p_config in (("one-node", PlatformConfig(platform=Platform.CPU, n_procs=2,
                                                         **sharded)),
                            ("two-nodes", PlatformConfig(**SLURM_CPU | sharded, n_nodes=2))):
        runs.append(Wrapper(p_config, artefacts(model=Blocks(width=64, depth=2))).start(
            ShardInspectingTrainer(job(tmp_path / where, epochs=2, save_every=2, **ACCUMULATE))))
    one_node, two_nodes = runs
    assert all(torch.equal(a, b) for a, b in zip(one_node.pop("held"), two_nodes.pop("held"),
                                                  strict=True))
    assert two_nodes == one_node
    assert shard_files(tmp_path / "one-node" / "checkpoint" / "ckpt_2") == \
        shard_files(tmp_path / "two-nodes" / "checkpoint" / "ckpt_2")


def fail_on_node_one() -> None:
    if world().node_rank == 1:
        raise ValueError("node one is unhappy")
    world().accelerator.wait_for_everyone()


def fail_on_node_one_while_node_zero_works() -> None:
    if world().node_rank == 1:
        raise ValueError("node one gave up")
    time.sleep(600)  # no collective: nothing on node 0 learns of node 1's failure by itself


def test_a_failing_node_surfaces_its_traceback_and_ends_the_others_at_once(cluster):
    p_config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_gpus=0, partition="debug",
                              timeout_min=5, verbose=False)
    # Side by side: node 0 waits for node 1 in a collective, or works on without one.
    waiting = Wrapper(p_config, wait=False).start(fail_on_node_one)
    working = Wrapper(p_config, wait=False).start(fail_on_node_one_while_node_zero_works)
    began = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 of 2 raised") as caught:
        waiting.wait()
    assert "ValueError: node one is unhappy" in caught.value.details
    assert re.search(rf"; logs in \S*{re.escape(waiting.folder.name)}$", caught.value.message), \
        caught.value.message

    with pytest.raises(WorkerError, match="rank 1 of 2 raised") as caught:
        working.wait()
    assert time.monotonic() - began < 120, "node 0 ran on after node 1 failed"
    assert "ValueError: node one gave up" in caught.value.details
    assert len(job_folders()) == 2
    shown = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", working.job_id],
                           capture_output=True, text=True)
    assert shown.stdout.strip() == "FAILED", shown


def test_a_function_runs_on_two_nodes_as_one_world_not_waiting_for_a_held_port(cluster):
    # The cluster numbers jobs in turn: the next job's id, and so its port, is known.
    last = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--output=/dev/null",
                           "--wrap=true"], capture_output=True, text=True, check=True)
    next_id = str(int(last.stdout.strip().split(";")[0]) + 1)
    with socket.socket() as holder:
        holder.bind(("", rendezvous_port(next_id)))
        holder.listen()
        # n_procs, and nothing said about GPUs: CPU processes, on a partition without GPUs.
        p_config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_procs=1,
                                  partition="debug", timeout_min=5, verbose=False)
        submission = Wrapper(p_config, wait=False).start(where, 10)
        assert submission.job_id == next_id
        assert submission.wait() == [(0, 0, 2, 21.0), (1, 1, 2, 21.0)]
    start = json.loads((submission.folder / "attempt-0.json").read_text())
    assert start["port"] != rendezvous_port(next_id)
    (folder,) = job_folders()
    assert (folder / "job").is_dir()


@pytest.mark.parametrize(("fields", "message"), [
    ({"partition": "nope"}, r"PlatformConfig\.partition='nope' is not a partition of this "
                            r"cluster: one of debug, gpu, urgent\.$"),
    ({"n_nodes": 3}, r"PlatformConfig\.n_nodes=3 is more than partition 'debug' has \(2\)"),
    ({"n_procs": 2, "cpus_per_task": 2}, r"4 cores per node .* more than the 2"),
    # A cpus_per_task that is given is asked for as given, never fitted to the nodes.
    ({"n_gpus": 2, "cpus_per_task": 2, "partition": "gpu"},
     r"4 cores per node .* more than the 2 of a node of partition 'gpu'"),
    # GPUs that the partition's nodes do not declare as GRES, which sbatch would refuse.
    ({"n_gpus": 1}, r"^PlatformConfig\.n_gpus=1 asks for 1 GPU\(s\) on each of 1 node\(s\), and "
                    r"partition 'debug' has no GPUs \(sinfo shows GRES \(null\) on its nodes\): "
                    r"for CPU processes set PlatformConfig\.n_gpus=0 with "
                    r"PlatformConfig\.n_procs=1, or choose a partition with GPUs\.$"),
    ({"n_gpus": 3, "partition": "gpu"},
     r"^PlatformConfig\.n_gpus=3 .* partition 'gpu' has at most 2 GPU\(s\) per node, and 0 "
     r"node\(s\) with 3 or more \(sinfo shows GRES gpu:2\): for CPU processes set "
     r"PlatformConfig\.n_gpus=0"),
    ({"n_gpus": 1, "n_nodes": 2, "partition": "gpu"},
     r"PlatformConfig\.n_nodes=2 is more than partition 'gpu' has \(1\)"),
])
def test_what_the_cluster_cannot_run_is_refused_before_submission(cluster, fields, message):
    p_config = PlatformConfig(**{"platform": Platform.SLURM, "n_gpus": 0, "partition": "debug",
                                 **fields})
    with pytest.raises(ConfigError, match=message):
        Wrapper(p_config).start(where, 0)
    assert not job_folders(), "a job was written"


@pytest.mark.parametrize(("gres", "gpus"), [
    ("(null)", 0), ("gpu:2", 2), ("gpu", 1), ("gpu:a100:4(S:0-1)", 4),
    ("gpu:a100:2(S:0),gpu:v100:2(S:1)", 4), ("shard:8,gpu:tesla:1", 1), ("mps:100", 0),
])
def test_the_gpus_in_sinfos_gres_column(gres, gpus):
    """The forms that sinfo -o %G prints on clusters (this one shows the first two)."""
    from ddpw.slurm import gres_gpus

    assert gres_gpus(gres) == gpus


@pytest.mark.parametrize(("fields", "said"), [
    ({"account": "nope"}, "Invalid account or account/partition combination specified"),
    ({"qos": "nope"}, "Invalid qos specification"),
    ({"slurm_parameters": {"begin": "notatime"}}, "sbatch: error: Invalid --begin specification"),
    # A GPU on the CPU partition, past ddpw's own check: what sbatch says of it.
    ({"n_gpus": 1, "check": False}, "Requested node configuration is not available"),
])
def test_what_sbatch_refuses_is_one_line_and_leaves_no_job_folder(cluster, monkeypatch, fields,
                                                                   said):
    fields = dict(fields)  # the parameters' own dict stays as it is for a rerun
    if not fields.pop("check", True):
        monkeypatch.setattr("ddpw.slurm.cluster._check_gpus", lambda *args: None)
    p_config = PlatformConfig(**{**SLURM_CPU, **fields})
    with pytest.raises(ConfigError) as caught:
        Wrapper(p_config).start(where, 0)
    message = str(caught.value)
    assert message.startswith("sbatch refused the job (check its partition, GPUs, "), message
    assert said in message and "\n" not in message, message
    assert not job_folders(), "the job's folder was left behind"


def test_the_controller_takes_a_gpu_job_whose_node_says_why_it_cannot_run_it(cluster):
    """g1 declares two GPUs that no driver backs: SLURM accepts and runs the job there, and
    the node refuses it before starting any process, saying why."""
    p_config = PlatformConfig(platform=Platform.SLURM, n_gpus=2, partition="gpu", mem_gb=1,
                              account="proj42", qos="normal", timeout_min=5, verbose=False)
    with pytest.raises(WorkerError) as caught:
        Wrapper(p_config).start(where, 0)
    (folder,) = job_folders()
    assert str(caught.value) == (
        "node g1: PlatformConfig.n_gpus=2 asks for 2 CUDA GPU(s) per node, but torch sees 0 here "
        "(CUDA_VISIBLE_DEVICES=0,1, SLURM_GPUS_ON_NODE=2: this torch is built without CUDA); "
        f"logs in {folder.resolve()}")
    (submitted,) = (folder / "slurm").glob("*_submission.sh")
    asked = submitted.read_text().splitlines()
    # Without cpus_per_task: 8 cores per GPU process, fitted to g1's 2 cores for its 2 GPUs.
    for line in ("#SBATCH --cpus-per-task=2", "#SBATCH --gpus-per-node=2", "#SBATCH --mem=1GB",
                 "#SBATCH --account=proj42", "#SBATCH --qos=normal", "#SBATCH --partition=gpu"):
        assert line in asked, line
    job_id = submitted.name.split("_")[0]
    shown = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,NodeList,AllocTRES",
                            "-j", job_id], capture_output=True, text=True).stdout
    state, nodes, tres = shown.strip().split("|")
    assert (state, nodes) == ("FAILED", "g1") and "gres/gpu=2" in tres, shown
    assert not list(folder.glob("rank-*")), "a process was started"


def test_slurm_tools_missing_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"needs SLURM's sbatch, sinfo, sacct and scancel "
                                          r".*\(missing: sbatch, sinfo"):
        Wrapper(PlatformConfig(platform=Platform.SLURM, n_gpus=0)).start(where, 0)


# --- preemption, time limits and requeue -------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Four epochs on 2 local processes without a stop: the reference for every resume."""
    path = tmp_path_factory.mktemp("uninterrupted")
    cpu2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    Wrapper(cpu2, artefacts(**EXACT)).start(
        SlowTrainer(job(path, epochs=4, save_every=4, **ACCUMULATE)))
    return final_files(path / "checkpoint" / "ckpt_4")


def wait_for(path: Path, submission, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        assert not submission.done(), f"the job ended first: {submission.result()}"
        time.sleep(0.1)


def noted_checkpoints(submission) -> list[str]:
    return [Path(line).name for line in
            (submission.folder / "checkpoints.txt").read_text().split()]


def slow_training(tmp_path, n_train: int = 150, **platform):
    p_config = PlatformConfig(**{**SLURM_CPU, **platform})
    return Wrapper(p_config, artefacts(n_train, **EXACT), wait=False).start(
        SlowTrainer(job(tmp_path, epochs=4, save_every=4, **ACCUMULATE)))


def assert_two_shares(folder: Path) -> None:
    """``folder`` is a checkpoint of 2 processes, whole, in which each wrote its share of the
    model and the optimiser."""
    manifest = ckpt.verify(folder)
    assert (manifest["world_size"], manifest["shares"]) == (2, 2), manifest
    for part in ("model", "optimiser"):
        for share in (1, 2):
            assert f"{part}-{share:05d}-of-00002.safetensors" in manifest["files"], (part, share)
        assert f"{part}.safetensors" not in manifest["files"], part


# One node of 2 processes here; two nodes of one (where each node writes a share) are in the
# real preemption's test below, whose USR2 comes from SLURM itself. On the other node, side by
# side, the same job with requeue_limit=0 fails instead, naming its checkpoint.
def test_a_signal_mid_epoch_pauses_requeues_and_resumes_bitwise_up_to_the_requeue_limit(
        cluster, tmp_path, uninterrupted):
    submission = slow_training(tmp_path, n_procs=2)
    limits = tmp_path / "limited"
    limits.mkdir()
    # Ten times the data, so that its epochs outlast the wait for the other job's signal: it
    # stops at its pause, so they cost no time.
    limited = slow_training(limits, n_train=1500, n_procs=2, requeue_limit=0)
    for job_, folder in ((submission, tmp_path), (limited, limits)):
        wait_for(folder / "mid-epoch", job_)
        subprocess.run(["scancel", "--signal=USR2", job_.job_id], check=True)
    with pytest.raises(WorkerError, match=r"PlatformConfig\.requeue_limit=0: not") as e:
        limited.wait()
    (paused,) = noted_checkpoints(limited)
    assert f"its newest checkpoint is {limits / 'checkpoint' / paused}" in str(e.value)

    metrics = submission.wait()
    assert metrics["epoch"] == 4
    paused, last = noted_checkpoints(submission)
    # Mid-epoch, or at the end of an epoch when the signal came during its last steps.
    assert re.fullmatch(r"ckpt_[123](_batch\d+)?", paused) and last == "ckpt_4", paused
    assert final_files(tmp_path / "checkpoint" / "ckpt_4") == uninterrupted
    for name in (paused, last):
        assert_two_shares(tmp_path / "checkpoint" / name)
    console = submission.console_log.read_text()
    assert "[ddpw] requeued SLURM job" in console
    assert f"[ddpw] attempt 2: resuming from {tmp_path / 'checkpoint' / paused}" in console
    # The goodput summary covers both attempts, one launch of the SLURM job's id, with the
    # wait in SLURM's queue between them; the parts add up to the wall time.
    attempts, summary = goodput_of(tmp_path / "logs")
    assert [a["ended"] for a in attempts] == ["paused", "completed"]
    assert {a["launch"] for a in attempts} == {submission.job_id}
    assert summary["attempts"] == 2 and summary["seconds"]["waiting"] > 0
    assert summary["lost_steps"] == 0  # a pause loses nothing


def test_a_real_preemption_of_a_two_node_job_requeues_it_and_resumes_bitwise(
        cluster, tmp_path, uninterrupted):
    submission = slow_training(tmp_path, n_nodes=2, n_procs=1, timeout_min=20)
    wait_for(tmp_path / "mid-epoch", submission)
    # Both nodes, exclusively, on the partition of higher priority: SLURM preempts our job.
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N2", "--exclusive",
                             "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 1"],
                            capture_output=True, text=True, check=True).stdout.strip()
    metrics = submission.wait()
    assert metrics["epoch"] == 4
    paused, last = noted_checkpoints(submission)
    # Mid-epoch, or at the end of an epoch when the signal came during its last steps.
    assert re.fullmatch(r"ckpt_[123](_batch\d+)?", paused) and last == "ckpt_4", paused
    assert final_files(tmp_path / "checkpoint" / "ckpt_4") == uninterrupted
    for name in (paused, last):
        assert_two_shares(tmp_path / "checkpoint" / name)
    console = submission.console_log.read_text()
    assert "[ddpw] requeued SLURM job" in console
    assert f"[ddpw] attempt 2: resuming from {tmp_path / 'checkpoint' / paused}" in console
    states = subprocess.run(["sacct", "-n", "-X", "-o", "State", "-j", urgent],
                            capture_output=True, text=True).stdout.split()
    assert states == ["COMPLETED"], states


def attempts(folder: str, work_s: float) -> int:
    """Counts its own runs in ``folder``; the first one takes ``work_s`` seconds."""
    mark = Path(folder) / f"runs-{world().global_rank}"
    runs = int(mark.read_text()) + 1 if mark.exists() else 1
    mark.write_text(str(runs))
    if runs == 1:
        (Path(folder) / "started").touch()
        time.sleep(work_s)
    return runs


def test_only_a_restartable_function_is_requeued(cluster, tmp_path):
    p_config = PlatformConfig(**SLURM_CPU, n_procs=2)
    (tmp_path / "again").mkdir()
    (tmp_path / "once").mkdir()
    again = Wrapper(p_config, wait=False).start(
        restartable(lambda folder: attempts(folder, work_s=300)), str(tmp_path / "again"))
    wait_for(tmp_path / "again" / "started", again)
    subprocess.run(["scancel", "--signal=USR2", again.job_id], check=True)
    # The second job runs while the first is requeued, on the other node.
    once = Wrapper(p_config, wait=False).start(attempts, str(tmp_path / "once"), 4)
    wait_for(tmp_path / "once" / "started", once)
    subprocess.run(["scancel", "--signal=USR2", once.job_id], check=True)
    assert again.wait() == [2, 2]  # ended, requeued and run again
    assert once.wait() == [1, 1]  # the signal did not stop it
    assert "is not marked ddpw.restartable" in (once.folder / "slurm" /
                                               f"{once.job_id}_0_log.err").read_text()


def test_a_cancelled_job_says_so(cluster, tmp_path):
    (tmp_path / "work").mkdir()
    submission = Wrapper(PlatformConfig(**SLURM_CPU), wait=False).start(
        attempts, str(tmp_path / "work"), 300)
    wait_for(tmp_path / "work" / "started", submission)
    submission.cancel()
    with pytest.raises(WorkerError, match=f"SLURM job {submission.job_id} was cancelled"):
        submission.wait()


# --- ddpw-launch --platform slurm ----------------------------------------------------------------

CPU_LAUNCH = [sys.executable, "-m", "ddpw", "--platform", "slurm", "--partition", "debug",
              "--timeout-min", "5"]
LAUNCH = [*CPU_LAUNCH, "--n-gpus", "0"]


def test_ddpw_launch_runs_a_plain_accelerate_script_and_shows_its_progress(cluster, tmp_path):
    # --n-procs and no --n-gpus: CPU processes.
    done = subprocess.run([*CPU_LAUNCH, "--n-procs", "2", str(TESTS / "scripts" /
                                                              "accelerate_train.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["params_equal"]
    assert "MULTI_CPU" in result["distributed_type"]
    shown = done.stderr  # ddpw's messages; the job's output goes to stdout
    # State changes as sacct shows them every 2 s (a job this short may skip RUNNING).
    assert "[ddpw] submitted SLURM job" in shown
    assert re.search(": (PENDING|RUNNING)", shown), shown
    assert shown.rstrip().endswith(": COMPLETED"), shown
    (folder,) = (tmp_path / "logs" / "console_logs").iterdir()
    assert {p.name for p in folder.glob("rank-*.log")} == {
        f"rank-{r}.{s}.log" for r in (0, 1) for s in ("stdout", "stderr")}


def test_ddpw_launch_gives_the_failing_ranks_status_and_traceback(cluster, tmp_path):
    # The command line: two nodes of one CPU process each, nothing said about GPUs.
    done = subprocess.run([*CPU_LAUNCH, "--n-nodes", "2", "--n-procs", "1",
                           str(TESTS / "scripts" / "accelerate_train.py"), "--fail-on-rank", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "[rank1]: RuntimeError: rank 1 fails on purpose" in done.stderr
    assert "[ddpw] rank 1 failed (exit status 1)" in done.stderr
    # torchrun's agents keep their lines in the job's folder, not on the console.
    for line in ("Sending process", "closing signal", "failed (exitcode"):
        assert line not in done.stdout + done.stderr, line
    (folder,) = (tmp_path / "logs" / "console_logs").iterdir()
    assert "failed (exitcode: 1)" in (folder / "agent-node1.log").read_text()


@pytest.mark.parametrize(("options", "said"), [
    (["--n-gpus", "1"], "Error: --n-gpus 1 asks for 1 GPU(s) on each of 1 node(s), and partition "
                        "'debug' has no GPUs (sinfo shows GRES (null) on its nodes): for CPU "
                        "processes set --n-gpus 0 with --n-procs 1, or choose a partition with "
                        "GPUs."),
    (["--n-gpus", "0", "--slurm-parameter", "begin=notatime"],
     "Error: sbatch refused the job (check its partition, GPUs, memory, account, QoS, "
     "constraint and other sbatch options): sbatch: error: Invalid --begin specification"),
])
def test_ddpw_launch_says_in_one_line_why_a_job_cannot_be_submitted(cluster, tmp_path, options,
                                                                    said):
    done = subprocess.run([*CPU_LAUNCH, *options, "--log-dir", str(tmp_path / "logs"),
                           str(TESTS / "scripts" / "accelerate_train.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    # That line alone says it: no usage banner, no traceback, and sbatch's own output is not
    # shown again.
    assert done.stderr == said + "\n" and not done.stdout, done.stderr
    assert not list((tmp_path / "logs").glob("*")), "the job's folder was left behind"


def test_ddpw_launch_dry_run_of_cpu_processes_asks_for_no_gpu(tmp_path):
    (tmp_path / "train.py").touch()
    done = subprocess.run([*CPU_LAUNCH, "--n-nodes", "2", "--n-procs", "1", "--dry-run",
                           "train.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=True)
    plan = json.loads(done.stdout)
    assert "gpus_per_node" not in plan["slurm"] and plan["slurm"]["nodes"] == 2
    assert plan["world_size"] == 2 and plan["env"]["ACCELERATE_USE_CPU"] == "1"


PLAIN_ACCELERATE = """
import json, os, sys
from accelerate import Accelerator

accelerator = Accelerator()
with open(sys.argv[1], "w") as f:
    json.dump({"mixed_precision": accelerator.mixed_precision,
               "device": accelerator.device.type,
               "distributed_type": str(accelerator.distributed_type)}, f)
"""


def test_a_one_process_slurm_task_gives_a_plain_accelerate_script_its_precision(tmp_path):
    """What the node runner starts for a world of one, without a cluster: the process that
    the node's task starts directly, not through accelerate launch."""
    from ddpw.launcher import Logs
    from ddpw.plan import MachineFacts, resolve_plan
    from ddpw.slurm.node import run_single

    script = tmp_path / "plain.py"
    script.write_text(PLAIN_ACCELERATE)
    config = PlatformConfig(**SLURM_CPU, n_procs=1, mixed_precision="bf16")
    plan = resolve_plan(config, MachineFacts.probe())
    entry = ["--module", "ddpw.entry", "--script", str(script), str(tmp_path / "seen.json")]
    outcome = run_single(plan, entry, Logs(tmp_path), forward=())
    assert not outcome.failures, (tmp_path / "rank-0.stderr.log").read_text()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"mixed_precision": "bf16", "device": "cpu",
                    "distributed_type": "DistributedType.NO"}


def test_ddpw_launch_of_one_process_gives_a_plain_accelerate_script_its_precision(cluster,
                                                                                   tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_ACCELERATE)
    done = subprocess.run([*CPU_LAUNCH, "--n-procs", "1", "--mixed-precision", "bf16",
                           str(script), str(tmp_path / "seen.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"mixed_precision": "bf16", "device": "cpu",
                    "distributed_type": "DistributedType.NO"}


def test_a_one_process_slurm_script_using_the_same_config_runs_in_place(cluster, tmp_path):
    """ddpw-launch --platform slurm of one process, whose script starts a Wrapper with the same
    SLURM config, as the docs suggest: it runs in the job, and submits no second one."""
    script = tmp_path / "wrapped.py"
    script.write_text(textwrap.dedent("""
        import json, os
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def where():
            return os.environ["SLURM_JOB_ID"], world().world_size, os.getpid()

        config = PlatformConfig(platform=Platform.SLURM, n_procs=1, partition="debug",
                                timeout_min=5, verbose=False)
        results = Wrapper(config).start(where)
        with open("result.json", "w") as f:
            json.dump({"results": results, "job": os.environ["SLURM_JOB_ID"],
                       "pid": os.getpid()}, f)
    """))
    done = subprocess.run([*CPU_LAUNCH, "--n-procs", "1", "--log-dir", str(tmp_path / "outer"),
                           str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    submitted = re.findall(r"\[ddpw\] submitted SLURM job (\d+)", done.stderr)
    seen = json.loads((tmp_path / "result.json").read_text())
    assert submitted == [seen["job"]], done.stderr
    assert seen["results"] == [[seen["job"], 1, seen["pid"]]], "not run in place"
    assert not (tmp_path / "logs").exists(), "a second job was submitted"


def test_ddpw_launch_no_wait_and_ctrl_c_cancelling(cluster, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(300)\n")
    submitted = subprocess.run([*LAUNCH, "--no-wait", str(script)], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(submitted.stdout)
    assert Path(info["folder"]).is_dir()
    subprocess.run(["scancel", info["job_id"]], check=True)

    # Ctrl-C's signal as a terminal gives it: a test run in the background by a shell without
    # job control (as CI may run it) would pass on SIGINT ignored, which Python honours.
    waiting = subprocess.Popen([*LAUNCH, "--on-interrupt", "cancel", str(script)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in waiting.stdout:
            if "sleeping" in line:
                break
        waiting.send_signal(signal.SIGINT)
        _, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()  # no process left behind for the next tests, whatever failed here
        waiting.wait()
    assert waiting.returncode == 130, err
    job_id = err.split("cancelled SLURM job ")[1].split(";")[0]
    deadline = time.monotonic() + 60
    while not (state := subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                                       capture_output=True, text=True).stdout).startswith(
            "CANCELLED"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_a_trainer_that_cannot_pause_on_the_requeue_signal_is_refused(tmp_path):
    p_config = PlatformConfig(**SLURM_CPU, requeue_signal="SIGUSR1")
    with pytest.raises(ConfigError, match=r"JobConfig\.pause_signals=.* lacks PlatformConfig\."
                                          r"requeue_signal='SIGUSR1'"):
        Wrapper(p_config, artefacts()).start(InspectingTrainer(job(tmp_path)))


def test_the_slurm_guides_example_trains_on_two_nodes(cluster, tmp_path):
    snippet = TESTS.parent / "docs" / "snippets" / "slurm_job.py"
    done = subprocess.run([sys.executable, str(snippet), "debug"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^epoch 5: loss \d\.\d{4}$", done.stdout, re.MULTILINE), done.stdout
    assert "SLURM, 2 node(s) x 1 process(s) = world of 2" in done.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoint" / "regression").iterdir()) == [
        "ckpt_1", "ckpt_2", "ckpt_3", "ckpt_4", "ckpt_5", "ckpt_latest"]


@pytest.mark.parametrize(("on_interrupt", "tty", "answer", "cancelled"), [
    ("ask", True, "y", True),
    ("ask", True, "n", False),
    ("ask", True, KeyboardInterrupt, True),  # a second Ctrl-C at the question insists
    ("ask", True, EOFError, True),
    ("ask", False, None, True),  # nobody to ask: no job left running unseen
    ("cancel", True, None, True),
    ("keep", True, None, False),
])
def test_ctrl_c_while_waiting_asks_cancels_or_keeps(monkeypatch, capsys, tmp_path, on_interrupt,
                                                    tty, answer, cancelled):
    """The terminal is what this machine's tests lack; the job is a stand-in that records
    whether it was cancelled (the real scancel is tested above)."""
    from ddpw.slurm import Submission

    submission = Submission("42", tmp_path, 2, 1, has_results=True, is_trainer=False,
                            verbose=False)
    calls = []
    monkeypatch.setattr(submission, "cancel", lambda: calls.append("scancel") or True)

    def follow():
        raise KeyboardInterrupt

    def ask(prompt):
        assert "cancel SLURM job 42?" in prompt
        if isinstance(answer, type):
            raise answer
        return answer

    monkeypatch.setattr(submission, "_follow", follow)
    monkeypatch.setattr("sys.stdin", type("Stdin", (), {"isatty": lambda self: tty})())
    monkeypatch.setattr("builtins.input", ask)
    with pytest.raises(KeyboardInterrupt):
        submission.wait(on_interrupt)
    assert calls == (["scancel"] if cancelled else [])
    err = capsys.readouterr().err
    assert ("cancelled SLURM job 42" in err) == cancelled
    assert ("runs on: follow it with" in err and "scancel 42" in err) == (not cancelled)


# --- hangs (ddpw.hang) ---------------------------------------------------------------------------

def test_a_rank_stuck_on_the_second_node_ends_the_job_as_hung(cluster, tmp_path):
    from hang_jobs import SleepingTrainer

    p_config = PlatformConfig(**{**SLURM_CPU, "n_nodes": 2, "n_procs": 1, "hang_timeout_s": 5})
    submission = Wrapper(p_config, artefacts(), wait=False).start(
        SleepingTrainer(job(tmp_path, epochs=2)))
    with pytest.raises(JobHung) as caught:
        submission.wait()
    assert caught.value.stuck == [1] and "in train_step (epoch 1, batch 5)" in caught.value.message
    assert "the stuck rank(s) of 2: rank 1 (" in caught.value.message
    assert "hang_jobs.py" in caught.value.details and "backward" in caught.value.details
    assert submission.state() == "FAILED"
    stacks = re.search(r"Every thread's stack of each rank: (\S+)/hang-0", caught.value.details)
    assert "the job hung (verdict at " in (Path(stacks.group(1)) / "hang-1.stacks.log").read_text()


def test_ddpw_launch_ends_a_script_that_hangs_on_two_nodes(cluster, tmp_path):
    from test_hang import SLEEPY_SCRIPT

    (tmp_path / "sleepy.py").write_text(SLEEPY_SCRIPT)
    done = subprocess.run([*CPU_LAUNCH, "--n-nodes", "2", "--n-procs", "1",
                           "--hang-timeout-s", "8", "sleepy.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == HUNG_EXIT_STATUS, done.stderr
    assert "the stuck rank(s) of 2: rank 1 (" in done.stderr
    assert "(sleepy.py:13): time.sleep(3600)" in done.stderr
    assert ": FAILED" in done.stderr  # sacct's state, as ddpw-launch follows it
