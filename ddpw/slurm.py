"""SLURM: a job submitted with submitit, whose one task per node runs ``accelerate launch``.

:func:`submit` runs on the submitting machine and returns a :class:`Submission`, which waits for
the job and shows its progress. :class:`NodeTask` is what submitit runs on each node of the
allocation. Everything about a job lives in one folder under the console logs path, which the
nodes must share with the submitting machine (as SLURM clusters' home and project file systems
are)::

    NAME-TIME/
        job/                 the pickled job; each rank's result or error report
        slurm/               submitit's files: JOBID_0_log.out is node 0's console
        rank-R.stdout.log    every rank's output (attempts after a requeue are appended)
        rank-R.stderr.log
        agent-nodeN.log      what torchrun's agent on node N logged (made when it logs)
        attempt-K.json       attempt K's start (K = SLURM_RESTART_COUNT): its checkpoint
        node-N.json          how node N's processes ended in the last attempt, and whether
                             node 0 requeued the job
        checkpoints.txt      the checkpoints the job wrote, newest last: a requeued job
                             resumes from the newest

Preemption and the time limit: SLURM sends ``requeue_signal`` ahead of both. A Trainer pauses
on it (every rank stops at the same step and a checkpoint is written); the node that holds rank
0 then requeues the job, which starts again from that checkpoint, by itself. Node 0 begins each
attempt: it clears the last attempt's reports and chooses the checkpoint, which every node then
reads from ``attempt-K.json``, so that all of them resume from the same one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import cloudpickle
import psutil
from submitit.core.utils import JobPaths
from submitit.slurm.slurm import SlurmParseException

from ._requeue_signal import REQUEUE_SIGNAL_ENV
from .errors import PAUSED_EXIT_STATUS, ConfigError, WorkerError
from .launcher import (
    FORWARDED,
    Logs,
    Outcome,
    collect,
    forward_signals,
    launch_env,
    new_job_folder,
    run_accelerate,
    write_job,
)
from .plan import NODE_RUNNER_ENV, LaunchPlan, rendezvous_port
from .platform import PlatformConfig
from .trainer import CHECKPOINT_RECORD_ENV, RESUME_ENV, Trainer
from .utils import is_restartable
from .worker import Job

#: What to do with a waited-for job on Ctrl-C: ask (cancel when there is no terminal to ask
#: on), cancel it, or keep it running.
ON_INTERRUPT = ("ask", "cancel", "keep")

#: Job states after which nothing more happens.
_FINAL = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "OUT_OF_MEMORY",
          "REVOKED", "TIMEOUT"}
#: Final too, unless SLURM requeues the job, as it may after a preemption or a node failure.
_MAYBE_FINAL = {"NODE_FAIL", "PREEMPTED"}
#: How long a state of :data:`_MAYBE_FINAL` must last to be taken as final.
_MAYBE_FINAL_S = 60.0


def submit(p_config: PlatformConfig, plan: LaunchPlan, logs: str | Path, job: Job | None = None,
           script: list[str] | None = None) -> Submission:
    """Submit a ddpw ``job``, or the ``script`` entry (``--script PATH ARGS...``), to SLURM.

    :param logs: the folder that gets the job's own folder, ``NAME-TIME``.
    :raises ConfigError: when the cluster cannot run the plan, or sbatch refuses the job
        (an unknown account or QoS, say).
    """
    import submitit

    plan = check_cluster(plan, fit=p_config.cpus_per_task is None)
    folder = new_job_folder(logs, p_config.name).resolve()
    if job is not None:
        write_job(dataclasses.replace(job, plan=plan), folder / "job")
        entry = ["--module", "ddpw.entry", str(folder / "job")]
        kind = ("pauses" if isinstance(job.target, Trainer) else
                "restartable" if is_restartable(job.target) else "plain")
    else:
        entry, kind = ["--module", "ddpw.entry", *script], "pauses"
    task = NodeTask(str(folder), plan, tuple(entry), kind, p_config.requeue_limit,
                    p_config.requeue_signal)
    executor = submitit.AutoExecutor(folder=folder / "slurm", cluster="slurm")
    executor.update_parameters(**executor_parameters(plan, kind))
    try:
        # submitit prints what sbatch said on stderr as well: it goes into the one error below.
        with contextlib.redirect_stderr(io.StringIO()):
            slurm_job = executor.submit(task)
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError,
            SlurmParseException, subprocess.SubprocessError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"sbatch refused the job (check PlatformConfig's partition, n_gpus, "
                          f"mem_gb, account, qos, constraint and slurm_parameters): "
                          f"{_one_line(error)}") from None
    return Submission(slurm_job.job_id, folder, plan.world_size, plan.slurm["nodes"],
                      has_results=job is not None, is_trainer=kind == "pauses" and job is not None,
                      verbose=p_config.verbose)


def executor_parameters(plan: LaunchPlan, kind: str) -> dict[str, Any]:
    """The parameters of submitit's executor for a job of ``kind`` (see :class:`NodeTask`):
    the plan's, and ``--requeue`` for a job that can requeue itself, ``--no-requeue`` for one
    that cannot."""
    parameters = dict(plan.slurm)
    # A job that never requeues itself must not be started again from scratch by SLURM either.
    requeue = "requeue" if kind != "plain" else "no-requeue"
    parameters["slurm_additional_parameters"] = {requeue: True,
                                                 **parameters["slurm_additional_parameters"]}
    return parameters


def _one_line(error: Exception) -> str:
    """What sbatch said, as one line: its ``error:`` lines when it gave any."""
    text = str(error)
    if isinstance(error, subprocess.CalledProcessError) and error.stderr:
        text = error.stderr if isinstance(error.stderr, str) else error.stderr.decode()
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    said = [line for line in lines if "error:" in line] or lines
    return "; ".join(said) or type(error).__name__


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
    shown = subprocess.run(["sinfo", "-h", "-o", "%R %D %c %G"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise ConfigError(f"sinfo cannot reach the cluster: {shown.stderr.strip()}")
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
        raise ConfigError(f"PlatformConfig: {plan.slurm['cpus_per_task']} cores per node "
                          f"(processes x cpus_per_task) is more than the {cpus} of a node of "
                          f"partition {partition!r}.")
    return plan


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


class Submission:
    """A job submitted to SLURM: its id and folder, and the means to wait for it or cancel it.

    ``Wrapper(..., wait=False).start(...)`` returns one at once; by default ``start`` calls
    :meth:`wait` itself.
    """

    def __init__(self, job_id: str, folder: Path, world_size: int, n_nodes: int, *,
                 has_results: bool, is_trainer: bool, verbose: bool) -> None:
        #: The SLURM job id.
        self.job_id = job_id
        #: The job's folder (see :mod:`ddpw.slurm`).
        self.folder = folder
        self.world_size, self.n_nodes = world_size, n_nodes
        self._has_results, self._is_trainer, self._verbose = has_results, is_trainer, verbose
        self._final: str | None = None
        if verbose:
            _say(f"submitted SLURM job {job_id}; logs in {folder}")

    @property
    def console_log(self) -> Path:
        """Node 0's console: the main rank's output, and submitit's messages."""
        return self.folder / "slurm" / f"{self.job_id}_0_log.out"

    def rank_logs(self) -> list[Path]:
        """Every rank's ``stdout`` and ``stderr`` log (complete once the job has ended)."""
        return [self.folder / f"rank-{r}.{stream}.log" for r in range(self.world_size)
                for stream in ("stdout", "stderr")]

    def state(self) -> str:
        """The job's state in SLURM's accounting (``PENDING``, ``RUNNING``, ``COMPLETED``...);
        ``UNKNOWN`` until accounting knows the job."""
        shown = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", self.job_id],
                               capture_output=True, text=True)
        lines = shown.stdout.split("\n") if shown.returncode == 0 else []
        # "CANCELLED by 0": the state is the first word; a requeued job's last line is its own.
        states = [line.split()[0] for line in lines if line.strip()]
        return states[-1] if states else "UNKNOWN"

    def done(self) -> bool:
        """Whether the job has ended for good (a job in a state that SLURM may still requeue
        counts as not done)."""
        return self.state() in _FINAL

    def cancel(self) -> bool:
        """Cancel the job (``scancel``): its processes get SIGTERM, so a Trainer pauses and
        saves a checkpoint if it can in SLURM's ``KillWait`` seconds.

        :returns: whether ``scancel`` succeeded (it fails for a job that has ended).
        """
        done = subprocess.run(["scancel", self.job_id], capture_output=True, text=True)
        if done.returncode != 0:
            _say(f"scancel {self.job_id} failed: {done.stderr.strip()}")
        return done.returncode == 0

    def wait(self, on_interrupt: str = "ask") -> Any:
        """Wait for the job to end, showing its state changes and the main rank's output (with
        ``PlatformConfig.verbose``), and return what :meth:`ddpw.wrapper.Wrapper.start` returns.

        :param on_interrupt: on Ctrl-C, ``"ask"`` whether to cancel the job (or cancel it when
            there is no terminal to ask on), ``"cancel"`` it, or ``"keep"`` it running; then
            :class:`KeyboardInterrupt` is raised.
        :raises WorkerError: when the job failed, was cancelled or ran out of time.
        :raises JobPaused: when a Trainer paused without requeueing (say, on SIGTERM).
        """
        if on_interrupt not in ON_INTERRUPT:
            raise ConfigError(f"on_interrupt={on_interrupt!r} is not valid: one of "
                              f"{', '.join(map(repr, ON_INTERRUPT))}.")
        try:
            self._follow()
        except KeyboardInterrupt:
            self._interrupted(on_interrupt)
            raise
        return self.result()

    def _follow(self) -> None:
        tail = _Tail(self.console_log) if self._verbose else None
        shown, started, last_poll, maybe_final_since = None, time.monotonic(), 0.0, None
        while self._final is None:
            now = time.monotonic()
            # sacct every 2 s at first, then every 10 s: a long job need not load the cluster.
            if now - last_poll >= (2.0 if now - started < 120 else 10.0):
                state, last_poll = self.state(), now
                if self._verbose and state not in (shown, "UNKNOWN"):
                    _say(f"SLURM job {self.job_id}: {state}")
                shown = state
                maybe_final_since = (maybe_final_since or now) if state in _MAYBE_FINAL else None
                if state in _FINAL or (maybe_final_since is not None
                                       and now - maybe_final_since >= _MAYBE_FINAL_S):
                    self._final = state
            if self._final is None and self._every_node_succeeded():
                # Sooner than sacct says so: the job is only tidying up.
                self._final = "COMPLETED"
                if self._verbose:
                    _say(f"SLURM job {self.job_id}: COMPLETED")
            if tail is not None:
                tail.show()
            if self._final is None:
                time.sleep(0.5)

    def _interrupted(self, on_interrupt: str) -> None:
        cancel = on_interrupt == "cancel"
        if on_interrupt == "ask":
            cancel = True  # unless someone at a terminal says otherwise
            if sys.stdin is not None and sys.stdin.isatty():
                try:
                    answer = input(f"\n[ddpw] cancel SLURM job {self.job_id}? [y/N] ")
                    cancel = answer.strip().lower() in ("y", "yes")
                except (KeyboardInterrupt, EOFError):
                    pass  # a second Ctrl-C (or Ctrl-D) insists
        if cancel and self.cancel():
            _say(f"cancelled SLURM job {self.job_id}; logs in {self.folder}")
        else:
            _say(f"SLURM job {self.job_id} runs on: follow it with `tail -f {self.console_log}`, "
                 f"cancel it with `scancel {self.job_id}`.")

    def result(self) -> Any:
        """What the ended job gives back: the main rank's metrics for a Trainer, the per-rank
        results for a function, ``None`` for a script (see :meth:`exit_status`).

        :raises WorkerError, JobPaused: as :meth:`wait`; :class:`RuntimeError` if the job has
            not ended.
        """
        state = self._ended()
        job_dir, where = self.folder / "job", f"; logs in {self.folder}"
        if state == "COMPLETED" and not self._has_results:
            return None  # a script: its exit status tells the rest
        if state == "COMPLETED" and self._has_results and self._results_appear(job_dir):
            values = collect(job_dir, self.world_size, Outcome({}, None))
            return values[0] if self._is_trainer else values
        # ddpw's own reason for ending the job (on any node) says more than SLURM's state,
        # CANCELLED included: a node that refuses the job cancels it for the others.
        refused = [record["refused"] for record in map(self._node_record, range(self.n_nodes))
                   if record.get("refused")]
        if refused:
            raise WorkerError(refused[0] + where)
        if state == "CANCELLED":
            raise WorkerError(f"SLURM job {self.job_id} was cancelled{where}")
        main_node = self._node_record(0)
        # After node 0 requeued the job, what its processes left is from an attempt that ended
        # well; the attempt that failed never got as far as to report.
        requeued = main_node.get("requeued", False)
        if self._has_results and not requeued and any(job_dir.glob("error-*.json")):
            collect(job_dir, self.world_size, Outcome({}, None))  # raises the rank's error
        after = " after requeueing itself" if requeued else ""
        raise WorkerError(f"SLURM job {self.job_id} ended {state}{after}{where}",
                          details=self._node_errors())

    def exit_status(self) -> tuple[int, dict[int, tuple[int, float]]]:
        """For a script: the job's exit status (as ``ddpw-launch`` gives it) and the ranks that
        failed, ``{rank: (status, time)}``."""
        state = self._ended()
        failures: dict[int, tuple[int, float]] = {}
        if not self._node_record(0).get("requeued", False):
            for node in range(self.n_nodes):
                failures.update({int(rank): tuple(failure) for rank, failure in
                                 self._node_record(node).get("failures", {}).items()})
        if state == "COMPLETED" and not failures:
            return 0, {}
        if state == "TIMEOUT":
            return 124, failures
        if state == "CANCELLED":
            return 128 + signal.SIGTERM, failures
        return 1, failures

    def _ended(self) -> str:
        if self._final is None:
            state = self.state()
            if state not in _FINAL and state not in _MAYBE_FINAL:
                raise RuntimeError(f"SLURM job {self.job_id} has not ended ({state}): call "
                                   f"wait() first.")
            self._final = state
        return self._final

    def _results_appear(self, job_dir: Path, timeout: float = 15.0) -> bool:
        """Whether every rank's result file is there, allowing a shared file system the time to
        show files written on the nodes."""
        deadline = time.monotonic() + timeout
        while not all((job_dir / f"result-{r}.pkl").is_file() for r in range(self.world_size)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def _every_node_succeeded(self) -> bool:
        """Whether submitit has recorded a successful end on every node (it records nothing
        for an attempt that requeued the job)."""
        paths = [JobPaths(self.folder / "slurm", self.job_id, node).result_pickle
                 for node in range(self.n_nodes)]
        return (all(path.is_file() for path in paths)
                and all(cloudpickle.loads(path.read_bytes())[0] == "success" for path in paths))

    def _node_record(self, node: int) -> dict[str, Any]:
        path = self.folder / f"node-{node}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _node_errors(self) -> str:
        """The tracebacks that submitit recorded for the nodes that failed, and the end of what
        their torchrun agents logged (how a rank that said nothing ended)."""
        errors = []
        for node in range(self.n_nodes):
            result = JobPaths(self.folder / "slurm", self.job_id, node).result_pickle
            if result.is_file():
                outcome, value = cloudpickle.loads(result.read_bytes())
                if outcome == "error":
                    errors.append(f"node {node}:\n{value}")
            agent = self.folder / f"agent-node{node}.log"
            if agent.is_file():
                tail = agent.read_text(errors="replace").splitlines()[-20:]
                errors.append(f"node {node}'s torchrun agent logged:\n" + "\n".join(tail))
        return "\n".join(errors)


def _say(message: str) -> None:
    """ddpw's own messages go to stderr; the job's output, to stdout."""
    print(f"[ddpw] {message}", file=sys.stderr, flush=True)


class _Tail:
    """Print what a growing file gains, line by line; a file that shrinks (a requeued job's
    console, opened anew) is read again from its start."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def show(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:
            self.offset, self.partial = 0, b""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self.partial + f.read()
            self.offset = f.tell()
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            print(line.decode(errors="replace"), flush=True)


@dataclasses.dataclass(frozen=True)
class NodeTask:
    """What submitit runs on each node of the allocation: this node's processes of the job.

    :param folder: the job's folder.
    :param plan: the job's plan; each node adds its rank and the rendezvous to it.
    :param entry: what every process runs (``--module ddpw.entry ...``).
    :param kind: ``"pauses"`` (a Trainer, or a script: the requeue signal is passed on to the
        processes, and a job that paused on it requeues), ``"restartable"`` (a function marked
        :func:`~ddpw.utils.restartable`: the processes are ended and the job requeues) or
        ``"plain"`` (a function: it runs on until SLURM ends it).
    :param requeue_limit: how many times the job may requeue itself.
    :param requeue_signal: the signal that SLURM sends ahead of a preemption or the time limit.
    """

    folder: str
    plan: LaunchPlan
    entry: tuple[str, ...]
    kind: str
    requeue_limit: int
    requeue_signal: str

    def __call__(self) -> None:
        sig = getattr(signal, self.requeue_signal)
        asked: list[signal.Signals] = []
        # From now on the signal is ddpw's, never submitit's: submitit would requeue the job
        # itself, past the limit, and without a checkpoint.
        signal.signal(sig, lambda signum, frame: self._asked(asked))
        folder, node = Path(self.folder), int(os.environ["SLURM_NODEID"])
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        start = (self._begin_attempt(folder, attempt) if node == 0 else
                 _await_json(folder / f"attempt-{attempt}.json"))
        env = {CHECKPOINT_RECORD_ENV: str(folder / "checkpoints.txt"),
               REQUEUE_SIGNAL_ENV: self.requeue_signal, NODE_RUNNER_ENV: str(os.getpid())}
        if start["resume"] is not None:
            env[RESUME_ENV] = start["resume"]
            if node == 0:
                print(f"[ddpw] attempt {attempt + 1}: resuming from {start['resume']}", flush=True)
        missing = self._missing_gpus()
        if missing:
            _write_json(folder / f"node-{node}.json", {
                "attempt": attempt, "requeued": False, "refused": missing, "failures": {}})
            if self.plan.slurm["nodes"] > 1:
                # The other nodes' processes would wait for this node's at the rendezvous,
                # holding the allocation until it times out.
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]],
                                   capture_output=True, timeout=60)
            raise RuntimeError(missing)
        procs = self.plan.world_size // self.plan.slurm["nodes"]
        outcome = self._run(node, env, Logs(folder, first_rank=node * procs, node=node), sig)
        requeue = (bool(asked) or sig in outcome.received) and self._requeues(outcome, sig)
        refused = None
        if requeue and node == 0:
            refused = self._requeue(attempt, _newest_checkpoint(folder / "checkpoints.txt"))
        _write_json(folder / f"node-{node}.json", {
            "attempt": attempt, "requeued": requeue and node == 0 and not refused,
            "refused": refused,
            "failures": {str(rank): failure for rank, failure in outcome.failures.items()}})
        if refused:
            raise RuntimeError(refused)
        if requeue:
            # No result for submitit to record: the job goes on in its next attempt. (Status 0
            # on the other nodes, so that no srun kills node 0 before it has requeued.)
            raise SystemExit(PAUSED_EXIT_STATUS if node == 0 else 0)
        if outcome.failures:
            raise RuntimeError(f"node {node}: processes failed: {outcome}")

    def _missing_gpus(self) -> str | None:
        """Why this node cannot give the job the CUDA GPUs it asks for, if it cannot: SLURM
        counts GPUs as the nodes declare them, whether or not torch can use them."""
        wanted = self.plan.slurm.get("gpus_per_node", 0)
        if not wanted:
            return None
        import torch

        # Not NVML's count alone, which includes GPUs that this torch's CUDA cannot use (an
        # old driver): this process starts its workers afresh, so initialising CUDA is safe.
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen >= wanted:
            return None
        why = ("this torch is built without CUDA" if torch.version.cuda is None else
               "torch finds no CUDA driver or device" if not seen else "too few are visible")
        return (f"node {os.environ.get('SLURMD_NODENAME', socket.gethostname())}: "
                f"PlatformConfig.n_gpus={wanted} asks for {wanted} CUDA GPU(s) per node, but "
                f"torch sees {seen} here (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, SLURM_GPUS_ON_NODE="
                f"{os.environ.get('SLURM_GPUS_ON_NODE', 'unset')}: {why})")

    def _asked(self, asked: list[signal.Signals]) -> None:
        """The requeue signal, when it is not passed on to the processes as it comes."""
        asked.append(getattr(signal, self.requeue_signal))
        if self.kind == "restartable":
            _signal_children(signal.SIGTERM)
        elif self.kind == "plain":
            print(f"[ddpw] {self.requeue_signal} from SLURM (preemption or time limit): this "
                  f"function is not marked ddpw.restartable, so it runs on until SLURM ends it",
                  file=sys.stderr, flush=True)

    def _begin_attempt(self, folder: Path, attempt: int) -> dict[str, Any]:
        """On node 0: clear what the last attempt's processes left, choose the checkpoint to
        resume from, and tell the other nodes (``attempt-K.json``)."""
        for stale in [*folder.glob("job/result-*.pkl"), *folder.glob("job/error-*.json"),
                      *folder.glob("node-*.json")]:
            stale.unlink(missing_ok=True)
        resume = _newest_checkpoint(folder / "checkpoints.txt") if attempt else None
        start = {"attempt": attempt, "resume": resume}
        _write_json(folder / f"attempt-{attempt}.json", start)
        return start

    def _run(self, node: int, env: dict[str, str], logs: Logs,
             sig: signal.Signals) -> Outcome:
        """Run this node's processes and return how they ended."""
        plan = dataclasses.replace(self.plan, env={**self.plan.env, **env})
        # A Trainer (or a script) pauses on the signal; a function's node runner handles it.
        forward = FORWARDED if self.kind == "pauses" else tuple(s for s in FORWARDED if s != sig)
        if plan.world_size == 1:
            return _run_single(plan, list(self.entry), logs, forward)
        port = rendezvous_port(os.environ["SLURM_JOB_ID"])
        plan = dataclasses.replace(plan, launch_args=(
            *plan.launch_args, "--machine_rank", str(node), "--main_process_ip", main_address(),
            "--main_process_port", str(port)))
        return run_accelerate(plan, list(self.entry), logs, forward)

    def _requeues(self, outcome: Outcome, sig: signal.Signals) -> bool:
        """Whether the job requeues after SLURM's signal: its processes paused (a Trainer), or
        were ended by the node runner (a restartable function)."""
        statuses = {status for status, _ in outcome.failures.values()}
        if self.kind == "restartable":
            return bool(statuses) and statuses <= {-signal.SIGTERM, -sig}
        ended = {PAUSED_EXIT_STATUS, -signal.SIGTERM}
        return self.kind == "pauses" and PAUSED_EXIT_STATUS in statuses and statuses <= ended

    def _requeue(self, attempt: int, resume: str | None) -> str | None:
        """Requeue the job; or, past the limit, say why not."""
        job_id = os.environ["SLURM_JOB_ID"]
        if attempt >= self.requeue_limit:
            how = (f"Resume it with JobConfig(start_at='latest') (its newest checkpoint is "
                   f"{resume})" if resume else "Start it again")
            return (f"SLURM job {job_id} was stopped ahead of a preemption or its time limit "
                    f"after {attempt} requeues, and PlatformConfig.requeue_limit="
                    f"{self.requeue_limit}: not requeued. {how}, with a longer timeout_min or "
                    f"a higher requeue_limit.")
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        print(f"[ddpw] requeued SLURM job {job_id} (attempt {attempt + 2} of at most "
              f"{self.requeue_limit + 1}); it resumes from {resume or 'its start'}", flush=True)
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def _await_json(path: Path, timeout: float = 300.0) -> dict[str, Any]:
    """What another node writes to ``path``, once it is there."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"node 0 did not begin this attempt: no {path} after {timeout} s")
        time.sleep(0.2)
    return json.loads(path.read_text())


def _newest_checkpoint(record: Path) -> str | None:
    """The newest checkpoint noted in ``record`` that still exists."""
    noted = record.read_text().split() if record.is_file() else []
    return next((path for path in reversed(noted) if Path(path).is_dir()), None)


def _signal_children(sig: signal.Signals) -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(sig)
        except psutil.Error:
            pass


def _run_single(plan: LaunchPlan, entry: list[str], logs: Logs,
                forward: tuple[signal.Signals, ...]) -> Outcome:
    """A world of one: ``accelerate launch`` wants two processes or more for a distributed
    launch, so the process is started directly, its output kept as a launched rank's is."""
    received: list[signal.Signals] = []
    handlers = forward_signals(received, forward)
    try:
        process = subprocess.Popen([sys.executable, "-m", *entry[1:]],
                                   env={**os.environ, **launch_env(plan.env)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        copies = [threading.Thread(target=_tee, args=(stream, logs.folder / f"rank-0.{name}.log",
                                                      console))
                  for stream, name, console in ((process.stdout, "stdout", sys.stdout),
                                                (process.stderr, "stderr", sys.stderr))]
        for copy in copies:
            copy.start()
        status = process.wait()
        for copy in copies:
            copy.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    failures = {0: (status, time.time())} if status else {}
    return Outcome(failures, received[0] if received else None, tuple(received))


def _tee(stream: IO[bytes], path: Path, console: IO[str]) -> None:
    with open(path, "ab") as log:
        for line in stream:
            log.write(line)
            log.flush()
            console.write(line.decode(errors="replace"))
            console.flush()


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
