"""The test SLURM cluster that scripts/slurm-cluster starts: two real slurmd nodes, accounting.

Every SLURM test of ddpw runs on this cluster. Where it cannot start at all (no root, no apt),
the tests are skipped with the script's reason, shown by `pytest -ra`.
"""

from __future__ import annotations

import subprocess

from conftest import SLURM_CLUSTER as SCRIPT


def run(env, *command: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_cluster_has_two_nodes_that_run_one_step_together(slurm):
    status = run(slurm, str(SCRIPT), "status")
    assert status.stdout.strip() == "running 2", status.stderr
    step = run(slurm, "srun", "-N2", "-n2", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME")
    assert step.returncode == 0, step.stderr
    assert sorted(step.stdout.split("\n")[:2]) == ["0 n1", "1 n2"]


def test_accounting_records_a_batch_job(slurm, tmp_path):
    # In a folder of its own: sbatch writes slurm-JOBID.out where it is run.
    submitted = run(slurm, "sbatch", "--parsable", "--wait", "--wrap", "true", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = run(slurm, "sacct", "-n", "-X", "-j", job_id, "-o", "State")
    assert state.stdout.split() == ["COMPLETED"], state.stdout + state.stderr
