"""Non-training tasks on every process, threads, ports, and running inside an existing launch."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import textwrap
import threading

import torch

from ddpw import Platform, PlatformConfig, Wrapper, world
from ddpw.plan import MachineFacts

CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)


def rank_report(offset: int, scale: int = 1) -> dict:
    w = world()
    total = w.accelerator.reduce(torch.tensor(float(w.global_rank + offset)), reduction="sum")
    return {"rank": w.global_rank, "local_rank": w.local_rank, "node_rank": w.node_rank,
            "world_size": w.world_size, "sum": float(total) * scale,
            "threads": torch.get_num_threads(), "device": str(w.device)}


def test_function_results_come_back_in_rank_order_after_a_real_all_reduce_with_the_threads_split(
        monkeypatch, no_leftover_processes):
    # Pretend to have 8 cores, so that the split differs from every default.
    probe = MachineFacts.probe
    monkeypatch.setattr(MachineFacts, "probe",
                        classmethod(lambda cls: dataclasses.replace(probe(), cpu_count=8)))
    results = Wrapper(CPU2).start(rank_report, 10, scale=2)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["local_rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["node_rank"] == 0 for r in results)
    assert all(r["sum"] == 2 * (10 + 11) for r in results)
    assert [r["threads"] for r in results] == [4, 4]
    pinned = PlatformConfig(platform=Platform.CPU, n_procs=2, cpus_per_task=3, verbose=False)
    assert [r["threads"] for r in Wrapper(pinned).start(rank_report, 0)] == [3, 3]


def test_a_world_of_one_leaves_the_callers_thread_count_alone():
    before = torch.get_num_threads()
    pinned = PlatformConfig(platform=Platform.CPU, cpus_per_task=before + 1, verbose=False)
    assert [r["threads"] for r in Wrapper(pinned).start(rank_report, 0)] == [before + 1]
    assert torch.get_num_threads() == before


def test_inside_a_multi_task_srun_step_the_job_runs_in_place(tmp_path):
    """Two processes with the variables that `srun -n 2` gives its tasks (no SLURM needed)."""
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent("""
        import os
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def who():
            w = world()
            return (w.global_rank, w.world_size, os.getpid())

        results = Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2)).start(who)
        with open(f"result-{os.environ['SLURM_PROCID']}.txt", "w") as f:
            f.write(repr((os.getpid(), results)))
    """))
    job_id = str(10_000 + os.getpid() % 50_000)  # the rendezvous port derives from the job id
    common = {"SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
              "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
              "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
              "SLURM_NODELIST": "localhost"}
    tasks = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                              stderr=subprocess.PIPE,
                              env={**os.environ, **common, "SLURM_PROCID": str(rank),
                                   "SLURM_LOCALID": str(rank)})
             for rank in (0, 1)]
    for task in tasks:
        _, err = task.communicate(timeout=120)
        assert task.returncode == 0, err
    for rank in (0, 1):
        pid, results = ast.literal_eval((tmp_path / f"result-{rank}.txt").read_text())
        assert [r[:2] for r in results] == [(0, 2), (1, 2)]
        assert results[rank][2] == pid


def test_a_world_of_one_runs_in_the_calling_process():
    def where() -> int:
        return os.getpid()

    assert Wrapper(PlatformConfig(platform=Platform.CPU)).start(where) == [os.getpid()]


def test_functions_defined_in_main_travel_by_value(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        from ddpw import Platform, PlatformConfig, Wrapper, world

        class Greeting:
            def __init__(self, word):
                self.word = word

        def greet(greeting):
            return f"{greeting.word} from {world().global_rank}"

        if __name__ == "__main__":
            p = PlatformConfig(platform=Platform.CPU, n_procs=2)
            print(Wrapper(p).start(greet, Greeting("hello")))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['hello from 0', 'hello from 1']" in out.stdout


def test_two_jobs_at_once_never_collide_on_a_port(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def total(i):
            return float(world().accelerator.reduce(torch.tensor(float(i)), reduction="sum"))

        print(Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2)).start(total, 3))
    """))
    jobs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for process in jobs:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert "[6.0, 6.0]" in out


def test_threads_of_one_process_launch_one_after_the_other():
    results: dict[int, object] = {}

    def start(i: int) -> None:
        try:
            results[i] = Wrapper(CPU2).start(rank_report, i)
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert isinstance(results[i], list), results[i]
        assert [r["sum"] for r in results[i]] == [2 * i + 1] * 2


def test_inside_torchrun_the_job_runs_in_place_without_launching_again(tmp_path):
    script = tmp_path / "inplace.py"
    script.write_text(textwrap.dedent("""
        import os
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def who():
            w = world()
            return (w.global_rank, w.world_size, os.getpid(), str(w.accelerator.distributed_type))

        results = Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2)).start(who)
        with open(f"result-{os.environ['RANK']}.txt", "w") as f:
            f.write(repr((os.getpid(), results)))
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        pid, results = ast.literal_eval((tmp_path / f"result-{rank}.txt").read_text())
        assert [r[0] for r in results] == [0, 1]
        assert all(r[1] == 2 and r[3] == "DistributedType.MULTI_CPU" for r in results)
        assert results[rank][2] == pid, "the job did not run in the launched process"


def test_in_place_a_different_world_size_or_precision_is_warned_about(tmp_path):
    script = tmp_path / "inplace.py"
    script.write_text(textwrap.dedent("""
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def who():
            return world().global_rank

        print(Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=3)).start(who))
    """))
    out = subprocess.run([sys.executable, "-m", "ddpw", "--platform", "cpu", "--n-procs", "2",
                          "--mixed-precision", "bf16", "--all-ranks", str(script)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[rank0]: [0, 1]" in out.stdout and "[rank1]: [0, 1]" in out.stdout
    for rank in (0, 1):  # on every rank, pointing at the caller's line
        assert (f"[rank{rank}]: {script}:7: UserWarning: ddpw runs in place, in the existing "
                f"launch's world of 2 processes; PlatformConfig asks for 3.") in out.stderr
        assert (f"[rank{rank}]: {script}:7: UserWarning: the launch asks for mixed precision "
                f"'bf16'; this job uses PlatformConfig.mixed_precision='no'.") in out.stderr
