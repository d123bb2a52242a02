"""What the cluster can run, asked of ``sinfo`` on the submitting machine before anything is
submitted."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess

from ..errors import ConfigError
from ..plan import LaunchPlan


def check_cluster(plan: LaunchPlan, fit: bool = False) -> LaunchPlan:
    """Check, before submitting, that the cluster can run ``plan`` at all; return the plan to
    submit.

    :param fit: the plan's cores per GPU process are ddpw's default
        (``PlatformConfig.cpus_per_task`` not given): fit them to the partition's nodes
        (:func:`fit_cores`). A number that was given is asked for as given.
    :raises ConfigError: for missing SLURM tools, an unknown partition, more nodes or cores per
        node than the partition has, or GPUs that its nodes do not declare (``sinfo`` shows no
        ``gpu`` GRES, or fewer than ``n_gpus`` per node).
    """
    missing = [tool for tool in ("sbatch", "sinfo", "sacct", "scancel") if not shutil.which(tool)]
    if missing:
        raise ConfigError(f"PlatformConfig.platform=Platform.SLURM needs SLURM's sbatch, sinfo, "
                          f"sacct and scancel on this machine's PATH (missing: "
                          f"{', '.join(missing)}); submit from a login node of the cluster.")
    partition = plan.slurm["slurm_partition"]
    command = ["sinfo", "-h", "-o", "%R %D %c %G"]
    shown = subprocess.run(command, capture_output=True, text=True)
    if shown.returncode != 0:
        raise ConfigError(_unanswered(command, shown.stderr))
    # A partition of several kinds of node has a line per kind: (nodes, cores, GRES) each.
    partitions: dict[str, list[tuple[int, int, str]]] = {}
    for line in shown.stdout.splitlines():
        name, nodes, cpus, gres = line.split(maxsplit=3)
        partitions.setdefault(name, []).append((int(nodes), int(cpus.rstrip("+")), gres))
    if partition not in partitions:
        raise ConfigError(f"PlatformConfig.partition={partition!r} is not a partition of this "
                          f"cluster: one of {', '.join(sorted(partitions))}.")
    kinds = partitions[partition]
    nodes, cpus = sum(kind[0] for kind in kinds), max(kind[1] for kind in kinds)
    if plan.slurm["nodes"] > nodes:
        raise ConfigError(f"PlatformConfig.n_nodes={plan.slurm['nodes']} is more than partition "
                          f"{partition!r} has ({nodes}).")
    _check_gpus(plan, partition, kinds)
    if fit:
        plan = fit_cores(plan, kinds)
    if plan.slurm["cpus_per_task"] > cpus:
        raise ConfigError(f"{plan.slurm['cpus_per_task']} cores per node (processes x "
                          f"PlatformConfig.cpus_per_task) is more than the {cpus} of a node of "
                          f"partition {partition!r}.")
    return plan


#: What SLURM's commands say when no controller answered them: its address is unknown (no
#: configuration names one, or its host name does not resolve) or nothing listens there.
_NO_CONTROLLER = re.compile(r"Unable to contact slurm controller|Unable to establish control "
                            r"machine address|Unable to resolve|Could not establish a "
                            r"configuration source|Connection refused")


def _unanswered(command: list[str], stderr: str) -> str:
    """One line for a SLURM command that failed, in place of its (many) lines of errors: that
    no controller answered, or else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # The line that says why (a name that does not resolve, a refused connection), without the
    # retries' noise around it.
    why = next((line for line in lines if _NO_CONTROLLER.search(line)), None)
    if why is not None:
        why = re.sub(rf"^{command[0]}: (error: |fatal: )?", "", why)
        return (f"no SLURM controller answered `{shlex.join(command)}` ({why}): "
                f"submit from a machine of the cluster, or check SLURM_CONF and that slurmctld "
                f"is running.")
    return f"`{shlex.join(command)}` failed: {lines[-1] if lines else 'no message'}."


def fit_cores(plan: LaunchPlan, kinds: list[tuple[int, int, str]]) -> LaunchPlan:
    """``plan`` with its cores per GPU process lowered, where needed, to a node's share: its
    cores divided by its GPUs, on the smallest share among the partition's nodes that have the
    GPUs the job asks for, and at least one. (Where no node has them, which sbatch then
    refuses, among all its nodes.)

    :param kinds: the partition's kinds of node, as ``sinfo`` shows them: (nodes, cores, GRES).
    """
    wanted = plan.slurm.get("gpus_per_node", 0)
    if not wanted or plan.threads_per_process is None:
        return plan
    able = [kind for kind in kinds if gres_gpus(kind[2]) >= wanted] or kinds
    shares = [cores // max(gres_gpus(gres), wanted) for _, cores, gres in able]
    threads = max(1, min(plan.threads_per_process, *shares))
    if threads == plan.threads_per_process:
        return plan
    procs = plan.world_size // plan.slurm["nodes"]
    return dataclasses.replace(plan, threads_per_process=threads,
                               env={**plan.env, "OMP_NUM_THREADS": str(threads)},
                               slurm={**plan.slurm, "cpus_per_task": procs * threads})


def _check_gpus(plan: LaunchPlan, partition: str, kinds: list[tuple[int, int, str]]) -> None:
    """sbatch would refuse GPUs that no node of the partition declares, as GRES, only after
    the job's folder is written, and with a message that names no field."""
    wanted = plan.slurm.get("gpus_per_node", 0)
    if not wanted:
        return
    enough = sum(nodes for nodes, _, gres in kinds if gres_gpus(gres) >= wanted)
    if enough >= plan.slurm["nodes"]:
        return
    most = max(gres_gpus(gres) for _, _, gres in kinds)
    declared = ", ".join(sorted({gres for _, _, gres in kinds}))
    has = (f"has no GPUs (sinfo shows GRES {declared} on its nodes)" if not most else
           f"has at most {most} GPU(s) per node, and {enough} node(s) with {wanted} or more "
           f"(sinfo shows GRES {declared})")
    procs = plan.world_size // plan.slurm["nodes"]
    raise ConfigError(f"PlatformConfig.n_gpus={wanted} asks for {wanted} GPU(s) on each of "
                      f"{plan.slurm['nodes']} node(s), and partition {partition!r} {has}: for CPU "
                      f"processes set PlatformConfig.n_gpus=0 with PlatformConfig.n_procs={procs}, "
                      f"or choose a partition with "
                      f"GPUs.")


def gres_gpus(gres: str) -> int:
    """The GPUs of a node in sinfo's GRES column: ``gpu:2``, ``gpu:a100:4(S:0-1)``,
    ``gpu:a100:2,gpu:v100:2`` (4), ``(null)`` (0)."""
    count = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        name, *rest = item.strip().split(":")
        if name == "gpu":
            count += int(rest[-1]) if rest and rest[-1].isdigit() else 1
    return count
