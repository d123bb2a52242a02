"""Jobs submitted to the real two-node SLURM cluster that scripts/slurm-cluster starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jobs import InspectingTrainer, artefacts, job

from ddpw import ConfigError, Platform, PlatformConfig, WorkerError, Wrapper, world


@pytest.fixture
def cluster(slurm, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)  # the job folders go under ./logs/console_logs


def where(offset: int) -> tuple[int, int, int, float]:
    w = world()
    total = w.accelerator.reduce(torch.tensor(float(w.global_rank + offset)), reduction="sum")
    return w.global_rank, w.node_rank, w.world_size, float(total)


def test_a_function_runs_on_two_nodes_as_one_world(cluster):
    p_config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_gpus=0, n_procs=1,
                              partition="debug", timeout_min=5, verbose=False)
    results = Wrapper(p_config).start(where, 10)
    assert results == [(0, 0, 2, 21.0), (1, 1, 2, 21.0)]


def test_a_trainer_runs_two_processes_on_one_node(cluster, tmp_path):
    p_config = PlatformConfig(platform=Platform.SLURM, n_gpus=0, n_procs=2, partition="debug",
                              timeout_min=5, verbose=False)
    result = Wrapper(p_config, artefacts()).start(InspectingTrainer(job(tmp_path, epochs=1)))
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert torch.equal(result["params"][0], result["params"][1])


def fail_on_node_one() -> None:
    if world().node_rank == 1:
        raise ValueError("node one is unhappy")
    world().accelerator.wait_for_everyone()


def test_a_failing_rank_surfaces_its_traceback(cluster):
    p_config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_gpus=0, partition="debug",
                              timeout_min=5, verbose=False)
    with pytest.raises(WorkerError, match="rank 1 of 2 raised") as caught:
        Wrapper(p_config).start(fail_on_node_one)
    assert "ValueError: node one is unhappy" in caught.value.details


@pytest.mark.parametrize(("fields", "message"), [
    ({"partition": "nope"}, r"PlatformConfig\.partition='nope' is not a partition of this "
                            r"cluster: one of debug, urgent"),
    ({"n_nodes": 3}, r"PlatformConfig\.n_nodes=3 is more than partition 'debug' has \(2\)"),
    ({"n_procs": 2, "cpus_per_task": 2}, r"4 cores per node .* more than the 2"),
])
def test_what_the_cluster_cannot_run_is_refused_before_submission(cluster, fields, message):
    p_config = PlatformConfig(**{"platform": Platform.SLURM, "n_gpus": 0, "partition": "debug",
                                 **fields})
    with pytest.raises(ConfigError, match=message):
        Wrapper(p_config).start(where, 0)
    assert not list((Path("logs")).glob("*/job")), "a job was written"


def test_slurm_tools_missing_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="needs SLURM's sbatch and sinfo"):
        Wrapper(PlatformConfig(platform=Platform.SLURM, n_gpus=0)).start(where, 0)
