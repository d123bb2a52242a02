import contextlib
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psutil
import pytest
import torch

SLURM_CLUSTER = Path(__file__).resolve().parent.parent / "scripts" / "slurm-cluster"
UNAVAILABLE = 3


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-check on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_leftover_processes():
    """Fail if a test leaves any child process of this one running."""
    yield
    children = psutil.Process(os.getpid()).children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left behind: {[p.cmdline() for p in alive]}"


def real_parts_required(env: Mapping[str, str] = os.environ) -> bool:
    """Whether a real part that cannot start here (the SLURM cluster, a tmpfs mount, network
    namespaces) fails the tests that need it instead of skipping them: on CI (``CI=true``, as
    CI runs ``.ci/run``), or with ``DDPW_REQUIRE_REAL=1``, which ``.ci/run`` sets."""
    return (env.get("CI", "").lower() in ("1", "true", "yes")
            or env.get("DDPW_REQUIRE_REAL", "") == "1")


def start_cluster(script: Path, env: Mapping[str, str]) -> tuple[dict[str, str], bool]:
    """Start the two-node cluster with ``script``, or find it running; return the environment
    its clients need, and whether this call started it (so that it alone stops it).

    A cluster that cannot work here at all (the script's exit status 3) skips the SLURM tests
    with the script's reason, or fails them where :func:`real_parts_required`.
    """
    started = subprocess.run([str(script), "start", "--nodes", "2"], capture_output=True,
                             text=True, timeout=CLUSTER_START_S, env=env)
    said = started.stderr.strip().splitlines()
    reason = [line for line in said if ": unavailable: " in line] or said[-1:] or ["(no reason)"]
    if started.returncode == UNAVAILABLE:
        if real_parts_required(env):
            pytest.fail(f"the SLURM cluster cannot start, and CI or DDPW_REQUIRE_REAL=1 "
                        f"requires it: {reason[0]}", pytrace=False)
        pytest.skip(f"no SLURM cluster here: {reason[0]}")
    assert started.returncode == 0, started.stderr
    export = started.stdout.strip().splitlines()[-1]
    name, _, value = export.removeprefix("export ").partition("=")
    # The script says so when it found the cluster running as asked (and restarts one of
    # another shape, which this call then stops too).
    return {**env, name: value}, "already running" not in started.stderr


#: How long starting the cluster may take (Debian's packages installed first, when missing).
CLUSTER_START_S = 600
#: Whether this session has tried to start the cluster yet.
_cluster_tried: list[bool] = []


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item):
    """The first SLURM test's time limit (which covers its fixtures) gets the cluster's start
    on top, apt included: ahead of pytest-timeout, which reads the limit as the test begins."""
    timed = item.config.pluginmanager.hasplugin("timeout")
    if timed and not _cluster_tried and "slurm" in getattr(item, "fixturenames", ()):
        marker = item.get_closest_marker("timeout")
        limit = (marker.args[0] if marker and marker.args else
                 marker.kwargs.get("timeout") if marker else
                 item.config.getoption("timeout", None) or item.config.getini("timeout"))
        if limit and float(limit) > 0:
            item.add_marker(pytest.mark.timeout(float(limit) + CLUSTER_START_S), append=False)
    if "slurm" not in getattr(item, "fixturenames", ()):
        yield
        return
    # One SLURM test at a time across scripts/test's pytest-xdist workers: each counts on the
    # cluster's nodes being free (a job of one worker's test, queued beside another's, once
    # ran a third time), and its fixtures are set up within its own turn.
    with open(Path(tempfile.gettempdir()) / f"ddpw-slurm-turn-{os.getppid()}", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def slurm():
    """A two-node cluster (and its GPU node g1) under the script's default root (the munge
    and mysql users must be able to reach it, which pytest's private temporary folders do not
    allow); yields the environment its clients need. A cluster found running is left
    running. ``DDPW_SLURM_CLUSTER`` names another script to start it with (the tests of this
    fixture use stand-ins).

    pytest-xdist's workers (``scripts/test`` runs two) each have a session of their own: they
    start the cluster one at a time, and the last worker to be done with it stops it, if a
    worker started it."""
    _cluster_tried.append(True)
    script = Path(os.environ.get("DDPW_SLURM_CLUSTER", SLURM_CLUSTER))
    users = Path(tempfile.gettempdir()) / f"ddpw-slurm-users-{os.getppid()}"
    with _locked(users) as count:
        env, started = start_cluster(script, os.environ)
        count(+1, started)
    yield env
    with _locked(users) as count:
        if count(-1, False):
            stopped = subprocess.run([str(script), "stop"], capture_output=True, text=True,
                                     timeout=120)
            assert stopped.returncode == 0, stopped.stderr


@contextlib.contextmanager
def _locked(path: Path):
    """Hold ``path``'s lock; yield ``count(change, started)``, which adds ``change`` to the
    workers using the cluster, notes whether one started it, and says whether the cluster is
    to be stopped now (no worker uses it any more, and one of them started it)."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)

        def count(change: int, started: bool) -> bool:
            users, ours = map(int, path.read_text().split()) if path.is_file() else (0, 0)
            users, ours = users + change, ours or int(started)
            path.write_text(f"{users} {ours}")
            if users == 0:
                path.unlink()
            return users == 0 and bool(ours)

        yield count
