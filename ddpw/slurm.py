"""SLURM: a job submitted with submitit, whose one task per node runs ``accelerate launch``.

:func:`submit` runs on the submitting machine; :func:`run_on_node` is what submitit runs on each
node of the allocation. The job travels through a folder under the console logs path, which the
nodes must share with the submitting machine (as SLURM clusters' home and project file systems
are).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, WorkerError
from .launcher import Outcome, collect, run_accelerate, write_job
from .plan import LaunchPlan, rendezvous_port
from .trainer import Trainer
from .worker import Job, execute


def submit(job: Job) -> list[Any]:
    """Submit ``job`` to SLURM, wait for it, and return the ranks' results in rank order.

    :raises WorkerError: when a rank fails or the job dies; its logs are in the job's folder.
    """
    import submitit

    check_cluster(job.plan)
    logs = Path(job.target.j_config.console_logs_path if isinstance(job.target, Trainer)
                else "./logs/console_logs")
    folder = (logs / f"{job.p_config.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    write_job(job, folder / "job")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(**job.plan.slurm)
    slurm_job = executor.submit(run_on_node, str(folder / "job"), job.plan)
    if job.p_config.verbose:
        print(f"[ddpw] submitted SLURM job {slurm_job.job_id}; logs in {folder}", flush=True)
    try:
        slurm_job.results()  # one per node
    except Exception as error:
        if not any((folder / "job").glob("error-*.json")):
            raise WorkerError(f"SLURM job {slurm_job.job_id} failed; logs in {folder}",
                              details=str(error)) from error
    # The ranks' reports in the job folder say more than submitit can.
    return collect(folder / "job", job.plan.world_size, Outcome({}, None))


def check_cluster(plan: LaunchPlan) -> None:
    """Check, before submitting, that the cluster can run ``plan`` at all.

    :raises ConfigError: for missing SLURM tools, an unknown partition, or more nodes or cores
        per node than the partition has.
    """
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("PlatformConfig.platform=Platform.SLURM needs SLURM's sbatch and sinfo "
                          "on this machine's PATH; submit from a login node of the cluster.")
    partition = plan.slurm["slurm_partition"]
    shown = subprocess.run(["sinfo", "-h", "-o", "%R %D %c"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise ConfigError(f"sinfo cannot reach the cluster: {shown.stderr.strip()}")
    partitions = {name: (int(nodes), int(cpus.rstrip("+")))
                  for name, nodes, cpus in (line.split() for line in shown.stdout.splitlines())}
    if partition not in partitions:
        raise ConfigError(f"PlatformConfig.partition={partition!r} is not a partition of this "
                          f"cluster: one of {', '.join(sorted(partitions))}.")
    nodes, cpus = partitions[partition]
    if plan.slurm["nodes"] > nodes:
        raise ConfigError(f"PlatformConfig.n_nodes={plan.slurm['nodes']} is more than partition "
                          f"{partition!r} has ({nodes}).")
    if plan.slurm["cpus_per_task"] > cpus:
        raise ConfigError(f"PlatformConfig: {plan.slurm['cpus_per_task']} cores per node "
                          f"(processes x cpus_per_task) is more than the {cpus} of a node of "
                          f"partition {partition!r}.")


def run_on_node(job_dir: str, plan: LaunchPlan) -> None:
    """On each node of the allocation: start this node's processes of the job.

    :raises RuntimeError: when a process of this node failed (its report is in ``job_dir``).
    """
    node = int(os.environ["SLURM_NODEID"])
    if plan.world_size == 1:
        if execute(Path(job_dir)):
            raise RuntimeError("the job's only process failed")
        return
    port = rendezvous_port(os.environ["SLURM_JOB_ID"])
    node_plan = dataclasses.replace(plan, launch_args=(
        *plan.launch_args, "--machine_rank", str(node), "--main_process_ip", main_address(),
        "--main_process_port", str(port)))
    outcome = run_accelerate(node_plan, ["--module", "ddpw.entry", job_dir])
    if outcome.failures or outcome.stopped_by is not None:
        raise RuntimeError(f"node {node}: processes failed: {outcome}")


def main_address() -> str:
    """The address of the job's first node, whether or not node names resolve.

    SLURM knows each node's address (``NodeAddr``); a name that only SLURM knows (several
    nodes on one machine, as in tests) would not resolve through DNS.
    """
    from submitit.slurm.slurm import SlurmJobEnvironment

    first = SlurmJobEnvironment().hostnames[0]
    shown = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True)
    match = re.search(r"NodeAddr=(\S+)", shown.stdout)
    return match.group(1) if match else socket.gethostbyname(first)
