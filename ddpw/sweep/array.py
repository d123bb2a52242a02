"""A sweep on SLURM: one job array, a task a point, at most ``parallelism`` running at once
(``--array=0-N%P``), split into several arrays above the cluster's ``MaxArraySize``.

Each task is a SLURM job of the configured width, run as a single job is
(:class:`~ddpw.slurm.node.NodeTask`, in the point's own job folder): on a preemption or the time
limit it pauses its Trainer, requeues itself alone (``scontrol requeue`` of its own job id) and
resumes from that checkpoint. Node 0 of each task keeps the point's record up to date
(:class:`SweepTask`), so that the record tells the truth when nobody waits for the array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import environment, jobfolder
from ..errors import PAUSED_EXIT_STATUS, ConfigError, JobPaused, WorkerError
from ..outcome import Outcome
from ..plan import LaunchPlan
from ..platform import PlatformConfig
from ..slurm.cluster import check_cluster
from ..slurm.node import NodeTask, RequeuePolicy
from ..slurm.submission import Submission, executor_parameters
from . import folder as sweep_folder

#: SLURM's default ``MaxArraySize``, where ``scontrol show config`` does not say.
DEFAULT_MAX_ARRAY_SIZE = 1001
#: submitit's folder inside the sweep folder, for every task of its arrays.
SUBMITIT_DIR = "slurm"


@dataclasses.dataclass(frozen=True)
class SweepTask:
    """What submitit runs on each node of a point's allocation: the point's
    :class:`~ddpw.slurm.node.NodeTask`, whose node 0 records the point's state and result.

    :param node_task: the point's job, as a single job would run it.
    :param sweep: the sweep folder.
    :param task: the point's name.
    :param has_results: the point runs a function, whose ranks leave results.
    """

    node_task: NodeTask
    sweep: str
    task: str
    has_results: bool

    def __call__(self) -> None:
        folder, main = Path(self.sweep), os.environ.get("SLURM_NODEID", "0") == "0"
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        os.environ.update({environment.SWEEP_FOLDER: self.sweep,
                           environment.SWEEP_TASK: self.task})
        if main:
            sweep_folder.update(folder, self.task, state="running", requeued=attempt)
        try:
            self.node_task()
        except SystemExit as stop:
            if main and stop.code == PAUSED_EXIT_STATUS:  # requeued: it goes on
                sweep_folder.update(folder, self.task, requeued=attempt + 1)
            elif main:
                sweep_folder.update(folder, self.task, state="failed",
                                    result={"exit_status": stop.code})
            raise
        except BaseException as error:
            if main:
                sweep_folder.update(folder, self.task, state="failed",
                                    result={"error": f"{type(error).__name__}: {error}"})
            raise
        if main:
            sweep_folder.update(folder, self.task, state="done", result=self._result())

    def _result(self) -> Any:
        job = Path(self.node_task.folder)
        if not self.has_results:
            return {"exit_status": 0,
                    "last_lines": sweep_folder.last_lines(jobfolder.rank_log(job, 0, "stdout"))}
        from ..shipping import dumps

        payload_dir, world_size = job / jobfolder.PAYLOAD_DIR, self.node_task.plan.world_size
        deadline = time.monotonic() + 30  # the other nodes' ranks, through a shared file system
        while not jobfolder.results_present(payload_dir, world_size) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        value = jobfolder.collect(payload_dir, world_size, Outcome({}, None))
        (sweep_folder.point_folder(Path(self.sweep), self.task) / "result.pkl").write_bytes(
            dumps(value)[0])
        return sweep_folder.as_json(value)


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (``scontrol show config``): an array's indices must be
    below it. SLURM's default where no cluster says."""
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    except OSError:  # no SLURM here (a dry run): its default
        return DEFAULT_MAX_ARRAY_SIZE
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", shown.stdout, re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def chunks(tasks: Sequence[str], size: int) -> list[list[str]]:
    """``tasks`` split into arrays of at most ``size`` tasks."""
    return [list(tasks[i:i + size]) for i in range(0, len(tasks), max(1, size))]


def sbatch_script(folder: Path, plan: LaunchPlan, policy: RequeuePolicy, n_tasks: int,
                  parallelism: int) -> str:
    """The sbatch script of an array of ``n_tasks`` points, as submitit writes it (for a dry
    run)."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    executor = submitit.AutoExecutor(folder=folder / SUBMITIT_DIR, cluster="slurm")
    executor.update_parameters(**executor_parameters(plan, policy),
                               slurm_array_parallelism=parallelism)
    parameters = executor._executor.parameters  # as submitit hands them to its sbatch script
    return _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=folder / SUBMITIT_DIR, map_count=n_tasks,
                               **{k: v for k, v in parameters.items() if k != "map_count"})


def submit_array(folder: Path, p_config: PlatformConfig, plan: LaunchPlan, tasks: Sequence[str],
                 entry: Callable[[str, Path, LaunchPlan], tuple[str, ...]],
                 policy: RequeuePolicy, parallelism: int, has_results: bool
                 ) -> dict[str, Submission]:
    """Submit ``tasks`` as one job array (several above ``MaxArraySize``); return each task's
    :class:`~ddpw.slurm.submission.Submission`.

    :param entry: what a point's processes run, given its name, its job folder and the plan
        (writing a function's payload there first).
    :param has_results: the points run a function, whose ranks leave results.
    :raises ConfigError: when the cluster cannot run the plan, or sbatch refuses the array.
    """
    import submitit
    from submitit.slurm.slurm import SlurmParseException

    from ..slurm.submission import _one_line

    plan = check_cluster(plan, fit=p_config.cpus_per_task is None)
    executor = submitit.AutoExecutor(folder=folder / SUBMITIT_DIR, cluster="slurm")
    executor.update_parameters(**executor_parameters(plan, policy),
                               slurm_array_parallelism=parallelism)
    submissions = {}
    for array in chunks(tasks, max_array_size()):
        folders = {task: jobfolder.make(sweep_folder.logs(folder, task), p_config.name).resolve()
                   for task in array}
        runs = [SweepTask(NodeTask(str(folders[task]), plan, entry(task, folders[task], plan),
                                   policy, p_config.requeue_limit, p_config.requeue_signal),
                          str(folder), task, has_results)
                for task in array]
        try:
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                jobs = [executor.submit(run) for run in runs]
        except (submitit.core.utils.UncompletedJobError,
                submitit.core.utils.FailedSubmissionError, SlurmParseException,
                subprocess.SubprocessError) as error:
            for path in folders.values():
                shutil.rmtree(path, ignore_errors=True)
            raise ConfigError(f"sbatch refused the sweep's array (check its partition, GPUs, "
                              f"memory, account, QoS, constraint and other sbatch options): "
                              f"{_one_line(error)}") from None
        for task, job, run in zip(array, jobs, runs, strict=True):
            sweep_folder.update(folder, task, state="running", requeued=0, job_id=job.job_id,
                                log_folder=str(folders[task]), result=None)
            submissions[task] = Submission(
                job.job_id, folders[task], plan.world_size, plan.slurm["nodes"],
                has_results=run.has_results, is_trainer=False, verbose=False,
                submitit_dir=folder / SUBMITIT_DIR)
    return submissions


def wait_all(folder: Path, submissions: dict[str, Submission], on_interrupt: str) -> list[str]:
    """Wait for every point's task; return the names of those that failed. A task that SLURM
    ended before its node 0 could say so (cancelled, a lost node) is recorded as failed."""
    failed = []
    for task, submission in submissions.items():
        try:
            submission.wait(on_interrupt)
        except (WorkerError, JobPaused) as error:
            failed.append(task)
            if sweep_folder.read(folder, task)["state"] == "running":
                sweep_folder.update(folder, task, state="failed",
                                    result={"error": str(error).splitlines()[0]})
        else:
            failed += [task] if sweep_folder.read(folder, task)["state"] == "failed" else []
    return failed


def refresh(folder: Path, records: list[dict[str, Any]]) -> None:
    """Points recorded ``running`` on SLURM whose task has ended without saying so are
    ``failed``: a second run of the sweep runs them again."""
    for i, record in enumerate(records):
        if record["state"] != "running" or not record.get("job_id"):
            continue
        state = Submission(record["job_id"], Path(record["log_folder"]), 1, 1,
                           has_results=False, is_trainer=False, verbose=False).state()
        if state in ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                     "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED"):
            records[i] = sweep_folder.update(folder, record["task"], state="failed",
                                             result={"error": f"SLURM job {state}"})
