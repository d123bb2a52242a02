"""The test SLURM cluster that scripts/slurm-cluster starts: two real slurmd nodes in partitions
debug and urgent, a third (g1) that declares GPUs in partition gpu, and accounting.

Every SLURM test of ddpw runs on this cluster. Where it cannot start at all (no root, no apt),
the tests are skipped with the script's reason, shown by `pytest -ra`; on CI (`CI=true`, or
`DDPW_REQUIRE_REAL=1`, as `.ci/run` sets) they fail with it instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SLURM_CLUSTER as SCRIPT
from conftest import start_cluster

TESTS = Path(__file__).resolve().parent


def run(env, *command: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_cluster_has_two_nodes_that_run_one_step_together(slurm):
    status = run(slurm, str(SCRIPT), "status")
    assert status.stdout.strip() == "running 3", status.stderr
    step = run(slurm, "srun", "-N2", "-n2", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME")
    assert step.returncode == 0, step.stderr
    assert sorted(step.stdout.split("\n")[:2]) == ["0 n1", "1 n2"]


def test_only_partition_gpu_has_gpus_and_its_node_hands_them_out(slurm):
    shown = run(slurm, "sinfo", "-h", "-o", "%R %N %G")
    assert sorted(shown.stdout.splitlines()) == [
        "debug n[1-2] (null)", "gpu g1 gpu:2", "urgent n[1-2] (null)"], shown.stderr
    step = run(slurm, "srun", "-p", "gpu", "--gpus-per-node=2", "bash", "-c",
               "echo $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES")
    assert step.stdout.strip() == "g1 0,1", step.stderr
    refused = run(slurm, "srun", "-p", "debug", "--gpus-per-node=1", "true")
    assert refused.returncode != 0
    assert "Requested node configuration is not available" in refused.stderr


def test_accounting_records_a_batch_job(slurm, tmp_path):
    # In a folder of its own: sbatch writes slurm-JOBID.out where it is run.
    submitted = run(slurm, "sbatch", "--parsable", "--wait", "--wrap", "true", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = run(slurm, "sacct", "-n", "-X", "-j", job_id, "-o", "State")
    assert state.stdout.split() == ["COMPLETED"], state.stdout + state.stderr


def test_accounting_enforces_the_accounts_of_the_user(slurm, tmp_path):
    ok = run(slurm, "sbatch", "--parsable", "--account=proj42", "--wrap", "true", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = run(slurm, "sbatch", "--account=nope", "--wrap", "true", cwd=tmp_path)
    assert "Invalid account or account/partition combination specified" in refused.stderr


# --- the slurm fixture, with stand-ins for the script -------------------------------------------

UNAVAILABLE = """#!/bin/sh
[ "$1" = status ] && { echo "not running: no cluster"; exit 1; }
echo "slurm-cluster: installing munge (log: /tmp/x.log)" >&2
echo "slurm-cluster: unavailable: needs root (it starts munge, MariaDB and Slurm daemons)" >&2
exit 3
"""
SLOW = """#!/bin/sh
[ "$1" = status ] && { echo "not running: no cluster"; exit 1; }
[ "$1" = start ] && { sleep 3; echo "export SLURM_CONF=/stand-in/slurm.conf"; }
exit 0
"""


def stand_in(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "slurm-cluster"
    script.write_text(text)
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(("env", "outcome"), [
    ({"CI": "true"}, pytest.fail.Exception),
    ({"CI": "1"}, pytest.fail.Exception),
    ({"DDPW_REQUIRE_REAL": "1"}, pytest.fail.Exception),
    ({}, pytest.skip.Exception),
    ({"CI": "false", "DDPW_REQUIRE_REAL": "0"}, pytest.skip.Exception),
])
def test_a_cluster_that_cannot_start_fails_on_ci_and_is_skipped_elsewhere(tmp_path, env,
                                                                          outcome):
    script = stand_in(tmp_path, UNAVAILABLE)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as caught:
        start_cluster(script, {"PATH": os.environ["PATH"], **env})
    assert caught.type is outcome
    assert str(caught.value).endswith(
        "slurm-cluster: unavailable: needs root (it starts munge, MariaDB and Slurm daemons)")


INNER = """
import time


def test_first(slurm):
    assert slurm["SLURM_CONF"] == "/stand-in/slurm.conf"


def test_second(slurm):
    time.sleep(3)
"""


def inner_session(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """A pytest session of its own, with this suite's conftest and a stand-in script."""
    (tmp_path / "test_inner.py").write_text(INNER)
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "DDPW_REQUIRE_REAL")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "conftest",
         "--rootdir", str(tmp_path), "-c", os.devnull, "--timeout", "2", "test_inner.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**clean, "PYTHONPATH": str(TESTS),
             "DDPW_SLURM_CLUSTER": str(stand_in(tmp_path, script)), **env})


# Which settings mean CI is the test above's; here, that the session goes red, or skips.
@pytest.mark.parametrize(("env", "status", "said"), [
    ({"DDPW_REQUIRE_REAL": "1"}, 1, "2 errors"),
    ({}, 0, "2 skipped"),
])
def test_a_test_session_goes_red_on_ci_when_the_cluster_cannot_start(tmp_path, env, status,
                                                                     said):
    done = inner_session(tmp_path, UNAVAILABLE, **env)
    assert done.returncode == status, done.stdout + done.stderr
    assert said in done.stdout and "unavailable: needs root" in done.stdout, done.stdout


def test_the_first_slurm_test_has_the_cluster_start_on_top_of_its_time_limit(tmp_path):
    """A start of 3 s under a limit of 2 s: the first test passes, and the second, which
    takes 3 s itself, still has 2 s."""
    done = inner_session(tmp_path, SLOW)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout, done.stdout
    assert "FAILED test_inner.py::test_second - Failed: Timeout" in done.stdout, done.stdout
