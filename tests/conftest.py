import os
import subprocess
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


@pytest.fixture(scope="session")
def slurm():
    """A two-node cluster under the script's default root (the munge and mysql users must be
    able to reach it, which pytest's private temporary folders do not allow); yields the
    environment its clients need."""
    started = subprocess.run([str(SLURM_CLUSTER), "start", "--nodes", "2"], capture_output=True,
                             text=True, timeout=600)
    if started.returncode == UNAVAILABLE:
        pytest.skip(f"no SLURM cluster here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    export = started.stdout.strip().splitlines()[-1]
    name, _, value = export.removeprefix("export ").partition("=")
    yield {**os.environ, name: value}
    stopped = subprocess.run([str(SLURM_CLUSTER), "stop"], capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0, stopped.stderr
