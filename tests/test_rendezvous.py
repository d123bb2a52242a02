"""Several machines without SLURM, as data: the rendezvous each node's plan carries, the
environment it reads, and the errors for what cannot meet, before any process starts."""

from __future__ import annotations

import dataclasses
import re
import socket

import pytest
import torch.distributed as dist
from test_plan import cpu, gpu, machine, option

from ddpw import rendezvous
from ddpw.errors import ConfigError
from ddpw.plan import LaunchMode, resolve_plan


def test_each_node_launches_its_own_share_of_a_static_rendezvous():
    plan = resolve_plan(cpu(2, n_nodes=2, node_rank=1, master_addr="node0", master_port=29511,
                            rendezvous_timeout_s=42), machine(cpus=8))
    assert plan.mode is LaunchMode.ACCELERATE and plan.world_size == 4
    assert plan.first_rank == 2 and plan.standalone is False
    assert option(plan, "--num_processes") == "4"
    assert option(plan, "--num_machines") == "2" and option(plan, "--machine_rank") == "1"
    assert option(plan, "--main_process_ip") == "node0"
    assert option(plan, "--main_process_port") == "29511"
    assert option(plan, "--rdzv_conf") == "timeout=42"
    assert plan.env["OMP_NUM_THREADS"] == "4" and plan.env["ACCELERATE_USE_CPU"] == "1"
    assert plan.rendezvous.endpoint == "node0:29511" and plan.rendezvous.read == {}


def test_one_process_per_node_is_still_launched_and_gpus_too():
    one = resolve_plan(cpu(1, n_nodes=2, node_rank=0, master_addr="10.0.0.1"), machine())
    assert one.mode is LaunchMode.ACCELERATE and one.world_size == 2
    assert option(one, "--main_process_port") == str(rendezvous.DEFAULT_PORT)
    gpus = resolve_plan(gpu(4, n_nodes=3, node_rank=2, master_addr="head"), machine(cuda=4))
    assert gpus.world_size == 12 and gpus.first_rank == 8
    assert gpus.accelerator_kwargs["cpu"] is False and "ACCELERATE_USE_CPU" not in gpus.env


@pytest.mark.parametrize("prefix", ["PET_", ""])
def test_the_environment_names_the_rendezvous(prefix):
    env = {f"{prefix}NNODES": "2", f"{prefix}NODE_RANK": "1",
           f"{prefix}MASTER_ADDR": "trainer-0.svc", f"{prefix}MASTER_PORT": "23456"}
    plan = resolve_plan(cpu(2), machine(env=env))
    assert plan.world_size == 4 and plan.first_rank == 2
    assert plan.rendezvous.endpoint == "trainer-0.svc:23456"
    assert plan.rendezvous.read == {"n_nodes": f"{prefix}NNODES",
                                    "node_rank": f"{prefix}NODE_RANK",
                                    "master_addr": f"{prefix}MASTER_ADDR",
                                    "master_port": f"{prefix}MASTER_PORT"}


def test_torchruns_variables_come_first_and_the_config_wins():
    env = {"PET_NNODES": "3", "NNODES": "9", "PET_NODE_RANK": "2", "NODE_RANK": "0",
           "PET_MASTER_ADDR": "a", "MASTER_ADDR": "b"}
    found = resolve_plan(cpu(1), machine(env=env)).rendezvous
    assert (found.nodes, found.node_rank, found.master_addr) == (3, 2, "a")
    given = resolve_plan(cpu(1, n_nodes=2, node_rank=0, master_addr="c", master_port=1234),
                         machine(env=env)).rendezvous
    assert (given.nodes, given.node_rank, given.endpoint) == (2, 0, "c:1234")
    # One machine, whatever MASTER_ADDR says without NNODES.
    assert resolve_plan(cpu(2), machine(env={"MASTER_ADDR": "x"})).rendezvous is None


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "two"}, "NNODES='two' in the environment (for PlatformConfig.n_nodes) is not "
                        "an integer >= 1"),
    ({"PET_NNODES": "3:2"}, "PET_NNODES='3:2' in the environment (for PlatformConfig.n_nodes) "
                            "is not N or MIN:MAX with 1 <= MIN <= MAX"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"},
     "NODE_RANK=2 is outside 0 to 1 for n_nodes=2"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "PlatformConfig.master_addr is not set"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "70000"},
     "MASTER_PORT='70000' in the environment (for PlatformConfig.master_port) is not an "
     "integer >= 1 and <= 65535"),
])
def test_bad_variables_are_named(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_plan(cpu(2), machine(env=env))


def test_an_address_that_does_not_resolve_is_refused_naming_where_it_came_from():
    meeting = rendezvous.of(cpu(1, n_nodes=2, node_rank=1), {"MASTER_ADDR": "no-such.invalid"})
    with pytest.raises(ConfigError, match=r"MASTER_ADDR='no-such.invalid' does not resolve"):
        rendezvous.check(meeting)
    rendezvous.check(rendezvous.of(cpu(1, n_nodes=2, node_rank=1, master_addr="127.0.0.1"), {}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchs_timeouts_become_sentences_that_say_who_waited_where():
    """torch's own errors, from real stores that wait in vain for a second node."""
    import datetime

    port = free_port()
    node0 = rendezvous.of(cpu(1, n_nodes=2, node_rank=0, master_addr="127.0.0.1",
                              master_port=port, rendezvous_timeout_s=1), {})
    with pytest.raises(dist.DistError) as alone:
        dist.TCPStore("127.0.0.1", port, 2, True, datetime.timedelta(seconds=1))
    said = str(rendezvous.explain(alone.value, node0))
    assert said.startswith(f"only 1 of 2 nodes joined the rendezvous within "
                           f"PlatformConfig.rendezvous_timeout_s=1 s at 127.0.0.1:{port}"), said
    node1 = rendezvous.of(cpu(1, n_nodes=2, node_rank=1, master_addr="127.0.0.1",
                              master_port=port, rendezvous_timeout_s=1), {})
    with pytest.raises(dist.DistError) as lost:
        dist.TCPStore("127.0.0.1", port, 2, False, datetime.timedelta(seconds=1))
    said = str(rendezvous.explain(lost.value, node1))
    assert said.startswith("node 1 could not reach node 0's rendezvous within "), said
    assert rendezvous.explain(RuntimeError("something else"), node1) is None


def dry_run(tmp_path, *args: str, env: dict[str, str] | None = None) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text("pass\n")
    launch = str(Path(sys.executable).with_name("ddpw-launch"))
    done = subprocess.run([launch, *args, "--dry-run", str(script)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_dry_run_shows_this_nodes_command_and_its_rendezvous(tmp_path):
    shown = dry_run(tmp_path, "--platform", "cpu", "--n-nodes", "2", "--node-rank", "1",
                    "--master-addr", "node0", "--master-port", "29512", "--n-procs", "2")
    assert shown["world_size"] == 4 and shown["standalone_rendezvous"] is False
    assert "--machine_rank 1 --main_process_ip node0 --main_process_port 29512" in shown["shell"]
    assert shown["rendezvous"] | {"per_node_args": None} == {
        "nodes": 2, "node_rank": 1, "endpoint": "node0:29512", "timeout_s": 600,
        "from_environment": {}, "first_rank": 2, "per_node_args": None, "elastic": False,
        "nnodes": "2", "max_restarts": 0}


def test_platform_auto_picks_up_a_kubernetes_operators_variables(tmp_path):
    shown = dry_run(tmp_path, "--platform", "auto", "--n-procs", "1",
                    env={"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-0",
                         "PET_MASTER_PORT": "23456"})
    assert shown["world_size"] == 3 and shown["mode"] == "accelerate"
    assert shown["rendezvous"]["endpoint"] == "job-0:23456"
    assert shown["rendezvous"]["from_environment"] == {
        "n_nodes": "PET_NNODES", "node_rank": "PET_NODE_RANK", "master_addr": "PET_MASTER_ADDR",
        "master_port": "PET_MASTER_PORT"}


def test_an_elastic_job_meets_in_c10d_with_a_range_and_restarts():
    plan = resolve_plan(cpu(2, n_nodes=3, min_nodes=1, max_restarts=2, master_addr="head",
                            name="job7"), machine())
    meeting = plan.rendezvous
    assert meeting.elastic and meeting.nnodes == "1:3" and meeting.run_id == "job7"
    assert meeting.node_rank == 0  # the rendezvous numbers the machines itself
    assert option(plan, "--rdzv_backend") == "c10d" and option(plan, "--max_restarts") == "2"
    assert "--rdzv_conf" not in plan.launch_args  # torchrun_options owns it
    assert option(plan, "--num_machines") == "3" and plan.world_size == 6
    once = plan.without_restarts()
    assert option(once, "--max_restarts") == "0" and once.rendezvous.max_restarts == 0
    static = resolve_plan(cpu(2, n_nodes=2, node_rank=0, master_addr="h"), machine())
    assert not static.rendezvous.elastic and option(static, "--max_restarts") == "0"
    assert static.without_restarts() is static


def test_the_environment_gives_an_elastic_range_and_restarts():
    meeting = resolve_plan(cpu(1), machine(env={"PET_NNODES": "1:2", "PET_MASTER_ADDR": "m",
                                                "PET_MAX_RESTARTS": "3"})).rendezvous
    assert (meeting.min_nodes, meeting.nodes, meeting.max_restarts) == (1, 2, 3)
    assert meeting.read["n_nodes"] == "PET_NNODES"


@pytest.mark.parametrize("fields, message", [
    ({"n_nodes": 2, "min_nodes": 3}, "PlatformConfig.min_nodes=3 is not valid: an integer from "
                                     "1 to n_nodes=2"),
    ({"n_nodes": 2, "min_nodes": 0}, "PlatformConfig.min_nodes=0 is not valid"),
    ({"n_nodes": 2, "max_restarts": -1}, "PlatformConfig.max_restarts=-1 is not valid"),
    ({"n_nodes": 2, "rendezvous_last_call_s": -1},
     "PlatformConfig.rendezvous_last_call_s=-1 is not valid"),
    ({"platform": "slurm", "n_nodes": 2, "min_nodes": 1},
     "PlatformConfig.min_nodes=1 is not valid: None on Platform.SLURM"),
])
def test_bad_elastic_fields_are_refused(fields, message):
    from ddpw.platform import PlatformConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        PlatformConfig(**{"platform": "cpu", **fields})


def test_dry_run_takes_min_max_nodes(tmp_path):
    shown = dry_run(tmp_path, "--platform", "cpu", "--n-nodes", "1:2", "--master-addr", "m",
                    "--max-restarts", "1", "--n-procs", "1")
    assert shown["rendezvous"]["elastic"] is True and shown["rendezvous"]["nnodes"] == "1:2"
    assert "--rdzv_backend c10d" in shown["shell"] and "--max_restarts 1" in shown["shell"]


def test_an_elastic_jobs_agent_on_node_0_of_its_machine_hosts_the_store():
    here = resolve_plan(cpu(1, n_nodes=2, min_nodes=1, master_addr="127.0.0.1", name="j",
                            rendezvous_timeout_s=42, rendezvous_last_call_s=3),
                        machine()).rendezvous
    options = rendezvous.torchrun_options(here)
    assert options["rdzv_conf"] == "join_timeout=42,last_call_timeout=3,is_host=1"
    assert options["nnodes"] == "1:2" and options["rdzv_id"] == "j"
    elsewhere = dataclasses.replace(here, node_rank=1)
    assert rendezvous.torchrun_options(elsewhere)["rdzv_conf"].endswith(",is_host=0")
    # Each world of an elastic job has a store of its own (torch's shared one strands a
    # machine that joins later); a fixed set of machines keeps torch's.
    assert rendezvous.agent_env(here)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    static = resolve_plan(cpu(1, n_nodes=2, node_rank=0, master_addr="127.0.0.1"), machine())
    assert rendezvous.torchrun_options(static.rendezvous) == {}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in rendezvous.agent_env(static.rendezvous)
    assert resolve_plan(cpu(1, n_nodes=2, min_nodes=1, master_addr="h"),
                        machine()).rendezvous.last_call_s == 10


def test_a_worlds_keys_in_the_launchs_store_are_named_alike_on_every_machine():
    """torchrun counts a lost machine as a restart, and a machine that joins counts from 0."""
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert rendezvous.store_attempt(shared) == "2"
    own = {"TORCHELASTIC_USE_AGENT_STORE": "False"}
    assert rendezvous.store_attempt({**own, "TORCHELASTIC_RESTART_COUNT": "1"}) == "0"
    assert rendezvous.store_attempt({**own, "TORCHELASTIC_RESTART_COUNT": "0"}) == "0"
    assert rendezvous.store_attempt({}) == "0"


def test_the_launch_line_says_which_ranks_a_machine_runs_only_when_it_knows():
    from ddpw.cli import _where

    static = resolve_plan(cpu(2, n_nodes=2, node_rank=1, master_addr="h"), machine())
    assert _where(static) == "node 1 of 2, ranks 2 to 3 of 4, meeting at h:29500"
    elastic = resolve_plan(cpu(2, n_nodes=3, min_nodes=2, master_addr="h"), machine())
    assert _where(elastic) == "2 processes here, on one of 2:3 machines meeting at h:29500"
    assert _where(resolve_plan(cpu(2), machine())) == "2 processes"


def test_each_world_checks_the_data_position_at_the_size_it_really_has(tmp_path):
    """An elastic job is planned for the most machines; a world of fewer must not resume a
    checkpoint that paused after no whole number of its own batches (it would re-see or skip
    samples). Rank 0 of each world checks it at the world's size (:func:`ddpw.resume.decide`),
    and a checkpoint of the job's own that does not fit is passed over for an older one."""
    from jobs import PausingTrainer, artefacts, job

    from ddpw import JobPaused, Platform, PlatformConfig, Wrapper, resume
    from ddpw.checkpoint import available
    from ddpw.checkpoint.state import TrainingState

    j, a = job(tmp_path, epochs=2, save_every=1), artefacts(n_train=64, batch_size=4)
    with pytest.raises(JobPaused) as paused:
        Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=1, verbose=False), a).start(
            PausingTrainer(j, at=(2, 2), rank=0))
    name = paused.value.checkpoint.rsplit("/", 1)[-1]
    consumed = TrainingState.read(tmp_path / "checkpoint" / name).samples_into_epoch
    assert available(tmp_path / "checkpoint", "ckpt") == ["ckpt_1", name]
    fits = {size: consumed % (4 * size) == 0 for size in (2, 3)}
    assert sorted(fits.values()) == [False, True], (consumed, fits)
    for size, fit in fits.items():
        # Chosen before the job began (planned), at the most machines' size: checked again.
        if fit:
            assert resume.decide(j, a, size, since=10**9, planned=name) == name
        else:
            with pytest.raises(ConfigError, match=f"no whole number of this job's batches of "
                                                  f"4 x {size} processes"):
                resume.decide(j, a, size, since=10**9, planned=name)
        # Written by the job itself: the newest that fits.
        assert resume.decide(j, a, size, since=0, planned=None) == (name if fit else "ckpt_1")
    # Before launch, an elastic job's plan (the most machines' size) is no world it will have:
    # the position is left to the worlds, where a job of that fixed size is refused.
    unfit = next(size for size, fit in fits.items() if not fit)
    resuming = PausingTrainer(job(tmp_path, epochs=2, save_every=1, start_at="latest"), at=(0, 0))
    one = PlatformConfig(platform=Platform.CPU, n_procs=1, verbose=False)
    assert resuming.check(one, a, world_size=unfit, elastic=True) == name
    with pytest.raises(ConfigError, match=f"batches of 4 x {unfit} processes"):
        resuming.check(one, a, world_size=unfit)


def _agreeing_rank(rank: int, store: str, folder: str, stale: str) -> None:
    """One rank of :func:`test_every_rank_begins_where_rank_0_decided_or_all_stop_saying_why`:
    prints what :func:`ddpw.resume.agree` gave it, or its error."""
    from pathlib import Path

    from ddpw import resume

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for case, name in (("agrees", "ckpt_1"), ("stale", "ckpt_2"), ("fails", None)):
            def decide(since: int, name: str | None = name, case: str = case):
                if case == "fails":
                    raise ConfigError("rank 0's own reason")
                assert since == 6, since  # the earliest rank's start
                return 3, 2, name
            # Rank 1's view of the folder: ckpt_2 as an older copy (a stale cache).
            here = Path(folder if rank == 0 or case != "stale" else stale)
            try:
                print(case, resume.agree(rank, 2, since=7 - rank, decide_here=decide,
                                         folder=here), flush=True)
            except ConfigError as error:
                print(case, "ConfigError:", error, flush=True)
    finally:
        dist.destroy_process_group()


def test_every_rank_begins_where_rank_0_decided_or_all_stop_saying_why(tmp_path):
    """Two real ranks: rank 0 numbers the world and chooses the checkpoint for both; a rank
    that sees that checkpoint otherwise (an older copy, as an attribute cache may show it),
    or rank 0 failing to decide, stops every rank with the same one-line error."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    for root, written in ((tmp_path / "folder", {"ckpt_1": 4, "ckpt_2": 9}),
                          (tmp_path / "stale", {"ckpt_2": 5})):
        for name, sequence in written.items():
            (root / name).mkdir(parents=True)
            (root / name / "manifest.json").write_text(json.dumps({"sequence": sequence}))
    tests = str(Path(__file__).resolve().parent)
    code = (f"import sys; sys.path.insert(0, {tests!r}); from test_rendezvous import "
            f"_agreeing_rank as r; r(int(sys.argv[1]), *sys.argv[2:])")
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(tmp_path / "store"),
                               str(tmp_path / "folder"), str(tmp_path / "stale")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        said = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    stale = (f"stale ConfigError: rank 1 does not see checkpoint ckpt_2 in {tmp_path / 'stale'} "
             f"as rank 0 does (written 5 here, 9 there): every machine must see the same "
             f"checkpoint_path, up to date")
    for rank, (out, err) in enumerate(said):
        lines = out.splitlines()
        assert lines[0] == "agrees Agreed(world=3, before=2, checkpoint='ckpt_1')", (out, err)
        assert lines[1].startswith(stale), (rank, out)
        assert lines[2] == "fails ConfigError: rank 0's own reason", (rank, out)
