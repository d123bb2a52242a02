"""Several machines without SLURM, for real: two network namespaces joined by a veth pair, each
running its node's ``ddpw-launch``, the MNIST example or a Trainer, meeting in torchrun's static
or elastic rendezvous; and, for a peer lost or never arriving, two launchers on 127.0.0.1."""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from jobs import final_files, goodput_of
from machines import Machine, namespaces

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "mnist" / "main.py"
LAUNCH = str(Path(sys.executable).with_name("ddpw-launch"))
#: A bound for a busy machine, not a speed.
BOUND_S = 400


@pytest.fixture
def machines():
    """Two machines, network namespaces: each binds gloo to its own end of the veth pair."""
    with namespaces() as pair:
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
        assert {(kind, world, total, gloo) for kind, _, world, total, gloo in found} == {
            ("DistributedType.MULTI_CPU", "4", "10.0", machines[rank].interface)}, run.stdout
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
    waited = f"within --rendezvous-timeout-s 3 s at 127.0.0.1:{port}"
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
    assert re.search(r"WorkerError: rank [01] of 4 lost its peers \(at 127\.0\.0\.1\): a "
                     r"process on another machine of the job failed first", node0.stdout), node0


ELASTIC = """
import os, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from jobs import BlobTrainer, artefacts
from ddpw import JobConfig, JobMode, Platform, PlatformConfig, Wrapper

NOTES = Path({notes!r})

class CountingTrainer(BlobTrainer):
    '''Slow steps; each step's samples noted with the world, the epoch and the batch, and,
    once a process, the checkpoint it began at, the world's size and torchrun's restart count.'''

    def train_step(self, batch):
        # Slow motion alone while the other machine starts: the job must not end before.
        time.sleep(1.5 if self.world_size == 1 and (NOTES / "hold").exists() else 0.1)
        world, rank = os.environ["DDPW_WORLD"], self.global_rank
        if not self.__dict__.get("noted"):
            self.noted = True
            (NOTES / f"began-{{world}}-{{rank}}.txt").write_text(
                f"{{self.resume_from}} {{os.environ['WORLD_SIZE']}} "
                f"{{os.environ['TORCHELASTIC_RESTART_COUNT']}}")
        with open(NOTES / f"seen-{{world}}-{{rank}}.txt", "a") as f:
            f.write(f"{{self.epoch}} {{self.batch}} {{' '.join(map(str, batch[2].tolist()))}}\\n")
        return super().train_step(batch)

    def save_checkpoint(self):
        if self.global_rank == 0:  # where in the data each world saved, in samples
            with open(NOTES / f"saved-{{os.environ['DDPW_WORLD']}}.txt", "a") as f:
                f.write(f"{{self.epochs_done}} {{self.batch * self.world_size * 4}}\\n")
        return super().save_checkpoint()

rank, address, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
p = PlatformConfig(platform=Platform.CPU, n_procs=1, n_nodes=2, min_nodes=1, max_restarts=1,
                   rendezvous_last_call_s=1, node_rank=rank, master_addr=address,
                   master_port=port, verbose=False)
j = JobConfig(job_type=JobMode.TRAIN, epochs={epochs}, save_every=1,
              checkpoint_path={checkpoint!r}, training_logs_path={logs!r})
metrics = Wrapper(p, artefacts(n_train={samples}, batch_size=4)).start(CountingTrainer(j))
print("METRICS", metrics["epoch"], flush=True)
"""


def steps(notes: Path, world: int) -> list[tuple[int, int, list[int]]]:
    """The steps noted in ``world`` over every rank: ``(epoch, batch, samples)``."""
    return [(int(epoch), int(batch), [int(i) for i in samples]) for path in
            sorted(notes.glob(f"seen-{world}-*.txt")) for line in path.read_text().splitlines()
            for epoch, batch, *samples in [line.split()]]


def counted(notes: Path, sizes: dict[int, int], batch_size: int) -> dict[int, list[int]]:
    """The samples of each epoch in the run that counts, by positions in the data ``(epochs
    done, samples into the next)``: the last world's, from where it began; before that, those of
    the world that saved where it began, up to there; and so on (a world whose checkpoints were
    lost, or passed over, counts for nothing)."""
    def at(epoch: int, batch: int, world: int) -> tuple[int, int]:
        return epoch - 1, batch * sizes[world] * batch_size

    start = {world: at(*steps(notes, world)[0][:2], world) for world in sizes}
    saved = {world: {tuple(map(int, line.split())) for line in
                     (notes / f"saved-{world}.txt").read_text().splitlines()}
             for world in sizes if (notes / f"saved-{world}.txt").exists()}
    chain = [max(sizes)]
    while start[chain[-1]] != (0, 0):
        chain.append(max(w for w in saved if w < chain[-1] and start[chain[-1]] in saved[w]))
    found: dict[int, list[int]] = {}
    for world, upto in zip(chain, [(math.inf, 0), *(start[w] for w in chain[:-1])],
                           strict=True):
        for epoch, batch, samples in steps(notes, world):
            if start[world] <= at(epoch, batch, world) < upto:
                found.setdefault(epoch, []).extend(samples)
    return found


def began(notes: Path, world: int) -> list[tuple[str, int, int]]:
    """Each rank's ``(checkpoint it began at, world size, torchrun's restart count)`` in
    ``world``."""
    return [(name, int(size), int(count)) for path in sorted(notes.glob(f"began-{world}-*"))
            for name, size, count in [path.read_text().split()]]


def test_elastic_machines_that_join_late_leave_and_come_back_agree_on_each_world(tmp_path):
    """2 network namespaces x 1 process, elastic 1:2, with torch's 30 s last call cut to 1 s.
    Machine 0 starts alone (a world of 1, fewer than the most); machine 1 joins later (a world
    of 2); every process of machine 1 is killed (a world of 1 again, one restart); machine 1
    comes back, where torchrun counts no restart (a world of 2, whose machines' restart counts
    differ: 1 and 0). In every world all ranks begin at the checkpoint rank 0 chose, the newest
    the job wrote (the newcomer too, never the payload's start), and each epoch's samples are
    seen once in the run that counts."""
    import psutil

    from ddpw import checkpoint as ckpt

    samples, epochs = 64, 10
    notes, folder = tmp_path / "notes", tmp_path / "checkpoint"
    notes.mkdir()
    script = tmp_path / "elastic.py"
    script.write_text(ELASTIC.format(tests=str(TESTS), notes=str(notes), epochs=epochs,
                                     checkpoint=str(folder), logs=str(tmp_path / "logs"),
                                     samples=samples))
    port = free_port()
    with namespaces() as machines:
        def start(rank: int) -> subprocess.Popen:
            return subprocess.Popen(
                machines[rank].command(sys.executable, str(script), str(rank),
                                       machines[0].address, str(port)),
                cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def until(what: str, done) -> None:
            deadline = time.monotonic() + BOUND_S
            while not done():
                for process in running:
                    assert process.poll() is None, (f"a machine ended before {what}",
                                                    process.communicate())
                assert time.monotonic() < deadline, f"never: {what}"
                time.sleep(0.05)

        def steps_in(world: int) -> int:
            return len(steps(notes, world))  # over every rank

        hold = notes / "hold"
        running = [start(0)]
        until("machine 0 alone wrote ckpt_1", lambda: ckpt.latest(folder, "ckpt") == "ckpt_1")
        hold.touch()
        running.append(start(1))
        until("a world of 2 trained 5 steps", lambda: steps_in(2) >= 2 * 5)
        hold.unlink()
        lost = psutil.Process(running.pop().pid)
        for process in [*lost.children(recursive=True), lost]:  # the whole machine, at once
            process.kill()
        lost.wait()
        until("the world of 1 again trained 6 steps", lambda: steps_in(3) >= 6)
        hold.touch()
        running.append(start(1))
        until("a world of 2 again", lambda: list(notes.glob("began-4-*")))
        hold.unlink()
        try:
            ends = [process.communicate(timeout=BOUND_S) for process in running]
        finally:
            for process in running:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
    for process, (out, err) in zip(running, ends, strict=True):
        assert process.returncode == 0, err
        assert f"METRICS {epochs}" in out, (out, err)
    said = ends[0][1]  # machine 0 (10.77.0.1) is rank 0 of every world: the lower address
    worlds = re.findall(r"\[ddpw\] world (\d) of the job: (\d) process\(es\) on (\d) "
                        r"machine\(s\), was (\d)(; lost \S+)?; resuming from (ckpt_\S+)", said)
    assert [w[:5] for w in worlds] == [
        ("2", "2", "2", "1", ""), ("3", "1", "1", "2", f"; lost {machines[1].address}"),
        ("4", "2", "2", "1", "")], said
    # Every rank of a world began where rank 0 said, at the world's size.
    assert began(notes, 1) == [("None", 1, 0)]
    for world, size in ((2, 2), (3, 1), (4, 2)):
        chosen = worlds[world - 2][5]
        assert {(name, n) for name, n, _ in began(notes, world)} == {(chosen, size)}, world
    # torchrun counts the loss alone, and the machine that came back counts from 0.
    assert sorted(count for *_, count in began(notes, 4)) == [0, 1]
    assert [count for *_, count in began(notes, 2)] == [0, 0]
    # The run that counts: each epoch's samples once each.
    sizes = {world: size for world in range(1, 5) for _, size, _ in began(notes, world)[:1]}
    found = counted(notes, sizes, batch_size=4)
    for epoch in range(1, epochs + 1):
        assert sorted(found[epoch]) == list(range(samples)), (epoch, sorted(found[epoch]))
    assert ckpt.read_manifest(folder / f"ckpt_{epochs}")["world_size"] == 2
    # Each world was an attempt of one job, whose goodput rank 0 (machine 0) kept: one launch,
    # the restarts resumed from the run's checkpoints; the parts add up to the wall time.
    attempts, summary = goodput_of(tmp_path / "logs")
    assert summary["attempts"] == len(attempts) == 4 and attempts[-1]["ended"] == "completed"
    assert len({a["launch"] for a in attempts}) == 1 and len({a["run"] for a in attempts}) == 1


def test_a_function_not_marked_restartable_is_not_restarted_and_names_the_lost_machine(
        tmp_path):
    """Elastic 1:2 with a restart allowed, on loopback: machine 1 dies in the middle of a
    function; machine 0's function is not started again, and its error names the peer."""
    import psutil

    script = tmp_path / "function.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import torch
        from pathlib import Path
        from ddpw import Platform, PlatformConfig, WorkerError, Wrapper
        from ddpw.utils import world

        def job(folder):
            Path(folder, f"started-{world().global_rank}").write_text("")
            for _ in range(600):
                torch.distributed.all_reduce(torch.ones(1))
                time.sleep(0.1)

        p = PlatformConfig(platform=Platform.CPU, n_procs=1, n_nodes=2, min_nodes=1,
                           max_restarts=1, node_rank=int(sys.argv[1]), master_addr="127.0.0.1",
                           master_port=int(sys.argv[2]), verbose=False)
        try:
            Wrapper(p).start(job, sys.argv[3])
        except WorkerError as error:
            print(f"WorkerError: {error.message}")
    """))
    port = free_port()
    started = [subprocess.Popen([sys.executable, str(script), str(rank), str(port),
                                 str(tmp_path)], text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        deadline = time.monotonic() + BOUND_S
        while not all((tmp_path / f"started-{rank}").exists() for rank in (0, 1)):
            assert all(p.poll() is None for p in started), [p.communicate() for p in started]
            assert time.monotonic() < deadline, "the function never started"
            time.sleep(0.05)
        lost = psutil.Process(started[1].pid)
        for process in [*lost.children(recursive=True), lost]:
            process.kill()
        out, err = started[0].communicate(timeout=BOUND_S)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert "WorkerError: rank 0 of 2 lost its peers (at 127.0.0.1): a process on another " \
           "machine of the job failed first" in out, (out, err)
    assert "restart" not in err, err


def test_machines_that_do_not_share_the_checkpoint_folder_are_refused_on_both(tmp_path):
    """Machine 1 mounts a tmpfs of its own at the checkpoint folder (a node-local disk): both
    machines end before training with the one-line error that SLURM jobs get."""
    from test_checkpoint_shares import not_one_folder

    root = tmp_path / "checkpoint"
    root.mkdir()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from jobs import BlobTrainer, artefacts, job
        from pathlib import Path
        from ddpw import ConfigError, Platform, PlatformConfig, Wrapper

        p = PlatformConfig(platform=Platform.CPU, n_procs=1, n_nodes=2,
                           node_rank=int(sys.argv[1]), master_addr=sys.argv[2],
                           master_port=int(sys.argv[3]), verbose=False)
        try:
            Wrapper(p, artefacts()).start(BlobTrainer(job(Path({str(tmp_path)!r}), epochs=1)))
        except ConfigError as error:
            print(f"ConfigError: {{error}}")
    """))
    port = free_port()
    with namespaces() as machines:
        def command(rank: int, machine: Machine) -> list[str]:
            run = [sys.executable, str(script), str(rank), machines[0].address, str(port)]
            if rank == 0:
                return run
            # A mount of its own: `ip netns exec` gives each command a mount namespace.
            return ["sh", "-c", f"mount -t tmpfs tmpfs {root} && exec {shlex.join(run)}"]

        runs = on_both(machines, command, tmp_path)
    said = not_one_folder(root, f"rank 1 on {socket.gethostname()}")
    for rank, run in enumerate(runs):
        assert run.returncode == 0, (rank, run.stderr)
        assert run.stdout.strip() == f"ConfigError: {said}", (rank, run.stdout, run.stderr)
    assert not list(root.iterdir()), "a probe or a checkpoint was left behind"
