"""Several machines without SLURM, for real: two network namespaces joined by a veth pair (or,
where namespaces cannot be made, two launchers on 127.0.0.1), each running its node's
``ddpw-launch`` or the MNIST example, meeting in torchrun's static rendezvous."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jobs import final_files
from machines import Machine, two_machines

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "mnist" / "main.py"
LAUNCH = str(Path(sys.executable).with_name("ddpw-launch"))
#: A bound for a busy machine, not a speed.
BOUND_S = 400


@pytest.fixture(params=["netns", "loopback"])
def machines(request):
    with two_machines(request.param) as pair:
        yield pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_both(machines: tuple[Machine, Machine], command, cwd: Path, timeout: float = BOUND_S,
            env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``command(node_rank, machine)`` on each machine at once (node 1 first), with
    ``env`` added to the environment; return both runs, node 0's first."""
    started = []
    for rank in (1, 0):
        started.append(subprocess.Popen(
            machines[rank].command(*command(rank, machines[rank])), cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}))
    runs = []
    try:
        for process in reversed(started):
            out, err = process.communicate(timeout=timeout)
            runs.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return runs


def test_an_unmodified_accelerate_script_runs_as_one_multi_cpu_world_of_2x2(machines,
                                                                             tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch
        from accelerate import Accelerator

        accelerator = Accelerator()
        total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), "sum")
        print(f"RESULT {accelerator.distributed_type} rank {accelerator.process_index} "
              f"world {accelerator.num_processes} sum {total.item()} "
              f"gloo {os.environ.get('GLOO_SOCKET_IFNAME')}", flush=True)
    """))
    port = free_port()

    def command(rank: int, machine: Machine) -> list[str]:
        return [LAUNCH, "--platform", "cpu", "--n-nodes", "2", "--node-rank", str(rank),
                "--master-addr", machines[0].address, "--master-port", str(port),
                "--n-procs", "2", "--all-ranks", "--log-dir", str(tmp_path / f"logs{rank}"),
                str(script)]

    for rank, run in enumerate(on_both(machines, command, tmp_path)):
        assert run.returncode == 0, (rank, run.stdout, run.stderr)
        found = re.findall(r"RESULT (\S+) rank (\d) world (\d) sum ([\d.]+) gloo (\S+)",
                           run.stdout)
        assert sorted(int(r) for _, r, *_ in found) == [2 * rank, 2 * rank + 1], run.stdout
        interface = machines[rank].interface or "lo"
        assert {(kind, world, total, gloo) for kind, _, world, total, gloo in found} == {
            ("DistributedType.MULTI_CPU", "4", "10.0", interface)}, run.stdout
        assert f"node {rank} of 2, ranks {2 * rank} to {2 * rank + 1} of 4" in run.stderr


def run_example(cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, sys.executable, str(EXAMPLE), "--platform", "cpu", "--mode", "train",
            "--epochs", "2", "--save-every", "2", "--quiet", "--checkpoint-path",
            str(cwd / "checkpoint"), *args]


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """The MNIST example trained for 2 epochs on 1 machine x 2 processes: the reference."""
    pytest.importorskip("sklearn", reason="the example's default data need scikit-learn")
    cwd = tmp_path_factory.mktemp("one-machine")
    done = subprocess.run(run_example(cwd, "--n-procs", "2"), cwd=cwd, capture_output=True,
                          text=True, timeout=BOUND_S)
    assert done.returncode == 0, done.stderr
    return final_files(cwd / "checkpoint" / "ckpt_2"), done.stdout


def test_the_example_on_2_machines_x_1_process_ends_bitwise_equal_to_1_machine_x_2(
        machines, tmp_path, one_machine):
    reference, said = one_machine
    port = free_port()

    def command(rank: int, machine: Machine) -> list[str]:
        return run_example(tmp_path, "--n-procs", "1", "--n-nodes", "2", "--node-rank",
                           str(rank), "--master-addr", machines[0].address,
                           "--master-port", str(port))

    # One compute thread per process, as each of the reference's two processes has: the same
    # arithmetic, so the same bits.
    runs = on_both(machines, command, tmp_path, env={"OMP_NUM_THREADS": "1"})
    for rank, run in enumerate(runs):
        assert run.returncode == 0, (rank, run.stderr)
        # Both machines get the job's metrics, as the one machine did.
        assert run.stdout == said, (rank, run.stdout, said)
    # Each rank wrote its share of the checkpoint into the folder that both machines see.
    assert final_files(tmp_path / "checkpoint" / "ckpt_2") == reference
    assert sorted(p.name for p in (tmp_path / "checkpoint" / "ckpt_2").glob("model*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]


@pytest.mark.parametrize("present", [0, 1])
def test_a_node_that_never_arrives_ends_the_other_naming_who_waited_where(tmp_path, present):
    """Only one of the two nodes starts: after --rendezvous-timeout-s it ends with one line."""
    script = tmp_path / "plain.py"
    script.write_text("print('never runs')\n")
    port = free_port()
    done = subprocess.run(
        [LAUNCH, "--platform", "cpu", "--n-nodes", "2", "--node-rank", str(present),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--n-procs", "1",
         "--rendezvous-timeout-s", "3", "--log-dir", str(tmp_path / "logs"), str(script)],
        capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2, (done.stdout, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    waited = f"within --rendezvous-timeout-s=3 s at 127.0.0.1:{port}"
    if present == 0:
        assert last.startswith(f"Error: only 1 of 2 nodes joined the rendezvous {waited} "
                               f"(this is node 0)"), last
    else:
        assert last.startswith(f"Error: node 1 could not reach node 0's rendezvous {waited}"), last
    assert "Traceback" not in done.stderr and "never runs" not in done.stdout


def test_a_rank_that_fails_on_one_machine_is_named_there_and_blamed_on_it_elsewhere(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        from ddpw import Platform, PlatformConfig, WorkerError, Wrapper
        from ddpw.utils import world

        def job():
            if world().global_rank == 2:
                raise ValueError("rank 2's own mistake")
            torch.distributed.all_reduce(torch.ones(1))

        p = PlatformConfig(platform=Platform.CPU, n_procs=2, n_nodes=2,
                           node_rank=int(sys.argv[1]), master_addr="127.0.0.1",
                           master_port=int(sys.argv[2]), verbose=False)
        try:
            Wrapper(p).start(job)
        except WorkerError as error:
            print(f"WorkerError: {error.message}")
            print(error.details)
    """))
    port = free_port()
    node0, node1 = on_both((Machine("127.0.0.1"),) * 2,
                           lambda rank, _: [sys.executable, str(script), str(rank), str(port)],
                           tmp_path)
    assert "WorkerError: rank 2 of 4 raised an exception" in node1.stdout, node1
    assert "ValueError: rank 2's own mistake" in node1.stdout
    assert re.search(r"WorkerError: rank [01] of 4 lost its peers: a process on another "
                     r"machine of the job failed first", node0.stdout), node0
