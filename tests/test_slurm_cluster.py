"""The test SLURM cluster that scripts/slurm-cluster starts: two real slurmd nodes, accounting.

Every SLURM test of ddpw runs on this cluster. Where it cannot start at all (no root, no apt),
the tests are skipped with the script's reason, shown by `pytest -ra`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm-cluster"
UNAVAILABLE = 3


@pytest.fixture(scope="module")
def slurm():
    """A two-node cluster under the script's default root (the munge and mysql users must be
    able to reach it, which pytest's private temporary folders do not allow); yields the
    environment its clients need."""
    started = subprocess.run([str(SCRIPT), "start", "--nodes", "2"], capture_output=True,
                             text=True, timeout=600)
    if started.returncode == UNAVAILABLE:
        pytest.skip(f"no SLURM cluster here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    export = started.stdout.strip().splitlines()[-1]
    name, _, value = export.removeprefix("export ").partition("=")
    yield {**os.environ, name: value}
    stopped = subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0, stopped.stderr


def run(env, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_the_cluster_has_two_nodes_that_run_one_step_together(slurm):
    status = run(slurm, str(SCRIPT), "status")
    assert status.stdout.strip() == "running 2", status.stderr
    step = run(slurm, "srun", "-N2", "-n2", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME")
    assert step.returncode == 0, step.stderr
    assert sorted(step.stdout.split("\n")[:2]) == ["0 n1", "1 n2"]


def test_accounting_records_a_batch_job(slurm):
    submitted = run(slurm, "sbatch", "--parsable", "--wait", "--wrap", "true")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = run(slurm, "sacct", "-n", "-X", "-j", job_id, "-o", "State")
    assert state.stdout.split() == ["COMPLETED"], state.stdout + state.stderr
