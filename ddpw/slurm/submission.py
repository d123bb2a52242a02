"""The submitting side: :func:`submit` hands a job to SLURM through submitit and returns a
:class:`Submission`, which waits for the job, shows its progress and reads its results from the
job folder (:mod:`ddpw.jobfolder`)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle

from .. import jobfolder
from ..errors import ConfigError, JobHung, WorkerError
from ..jobfolder import Payload
from ..outcome import Outcome
from ..plan import LaunchPlan
from ..platform import PlatformConfig
from ..utils import is_restartable, is_trainer
from . import ON_INTERRUPT
from .cluster import check_cluster
from .node import NodeTask, RequeuePolicy

#: Job states after which nothing more happens.
_FINAL = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "OUT_OF_MEMORY",
          "REVOKED", "TIMEOUT"}
#: Final too, unless SLURM requeues the job, as it may after a preemption or a node failure.
_MAYBE_FINAL = {"NODE_FAIL", "PREEMPTED"}
#: How long a state of :data:`_MAYBE_FINAL` must last to be taken as final.
_MAYBE_FINAL_S = 60.0


def submit(p_config: PlatformConfig, plan: LaunchPlan, logs: str | Path,
           payload: Payload | None = None, script: list[str] | None = None) -> Submission:
    """Submit a ddpw ``payload``, or the ``script`` entry (``--script PATH ARGS...``), to SLURM.

    :param logs: the folder that gets the job's own folder, ``NAME-TIME``.
    :raises ConfigError: when the cluster cannot run the plan, or sbatch refuses the job
        (an unknown account or QoS, say).
    """
    import submitit
    from submitit.slurm.slurm import SlurmParseException

    from ..shipping import ship  # here: a script's submission (ddpw-launch) needs no torch

    plan = check_cluster(plan, fit=p_config.cpus_per_task is None)
    folder = jobfolder.make(logs, p_config.name).resolve()
    if payload is not None:
        jobfolder.write_payload(folder / jobfolder.PAYLOAD_DIR,
                                ship(dataclasses.replace(payload, plan=plan)))
        entry = ["--module", "ddpw.entry", str(folder / jobfolder.PAYLOAD_DIR)]
        policy = (RequeuePolicy.PAUSES if is_trainer(payload.target) else
                  RequeuePolicy.RESTARTS if is_restartable(payload.target) else
                  RequeuePolicy.RUNS_ON)
    else:
        entry, policy = ["--module", "ddpw.entry", *script], RequeuePolicy.PAUSES
    task = NodeTask(str(folder), plan, tuple(entry), policy, p_config.requeue_limit,
                    p_config.requeue_signal)
    executor = submitit.AutoExecutor(folder=folder / jobfolder.SUBMITIT_DIR, cluster="slurm")
    executor.update_parameters(**executor_parameters(plan, policy))
    try:
        # submitit prints what sbatch said on stderr as well: it goes into the one error below.
        with contextlib.redirect_stderr(io.StringIO()):
            slurm_job = executor.submit(task)
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError,
            SlurmParseException, subprocess.SubprocessError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"sbatch refused the job (check its partition, GPUs, memory, "
                          f"account, QoS, constraint and other sbatch options): "
                          f"{_one_line(error)}") from None
    return Submission(slurm_job.job_id, folder, plan.world_size, plan.slurm["nodes"],
                      has_results=payload is not None,
                      is_trainer=payload is not None and policy is RequeuePolicy.PAUSES,
                      verbose=p_config.verbose)


def executor_parameters(plan: LaunchPlan, policy: RequeuePolicy) -> dict[str, Any]:
    """The parameters of submitit's executor for a job of ``policy``: the plan's, and
    ``--requeue`` for a job that can requeue itself, ``--no-requeue`` for one that cannot."""
    parameters = dict(plan.slurm)
    # A job that never requeues itself must not be started again from scratch by SLURM either.
    requeue = "no-requeue" if policy is RequeuePolicy.RUNS_ON else "requeue"
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


class Submission:
    """A job submitted to SLURM: its id and folder, and the means to wait for it or cancel it.

    ``Wrapper(..., wait=False).start(...)`` returns one at once; by default ``start`` calls
    :meth:`wait` itself.
    """

    def __init__(self, job_id: str, folder: Path, world_size: int, n_nodes: int, *,
                 has_results: bool, is_trainer: bool, verbose: bool,
                 submitit_dir: Path | None = None) -> None:
        #: The SLURM job id.
        self.job_id = job_id
        #: The job's folder (see :mod:`ddpw.jobfolder`).
        self.folder = folder
        self.world_size, self.n_nodes = world_size, n_nodes
        self._has_results, self._is_trainer, self._verbose = has_results, is_trainer, verbose
        self._final: str | None = None
        # A sweep's tasks share one submitit folder, the sweep's (ddpw.sweep.array).
        self._submitit_dir = submitit_dir or folder / jobfolder.SUBMITIT_DIR
        if verbose:
            _say(f"submitted SLURM job {job_id}; logs in {folder}")

    @property
    def console_log(self) -> Path:
        """Node 0's console: the main rank's output, and submitit's messages."""
        return self._submitit_dir / f"{self.job_id}_0_log.out"

    def rank_logs(self) -> list[Path]:
        """Every rank's ``stdout`` and ``stderr`` log (complete once the job has ended)."""
        return [jobfolder.rank_log(self.folder, r, stream) for r in range(self.world_size)
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
        payload_dir, where = self.folder / jobfolder.PAYLOAD_DIR, f"; logs in {self.folder}"
        if state == "COMPLETED" and not self._has_results:
            return None  # a script: its exit status tells the rest
        if state == "COMPLETED" and self._has_results and self._results_appear(payload_dir):
            values = jobfolder.collect(payload_dir, self.world_size, Outcome({}, None))
            return values[0] if self._is_trainer else values
        # ddpw's own reason for ending the job (on any node) says more than SLURM's state.
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
        if self._has_results and not requeued and (jobfolder.hang_report(payload_dir)
                                                   or jobfolder.reports(payload_dir,
                                                                        self.world_size)):
            try:
                jobfolder.collect(payload_dir, self.world_size, Outcome({}, None))  # raises it
            except JobHung:
                raise  # its report names the files of every rank's stacks
            except WorkerError as error:
                raise WorkerError(error.message + where, error.rank, error.status,
                                  error.details) from None
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

    def _results_appear(self, payload_dir: Path, timeout: float = 15.0) -> bool:
        """Whether every rank's result is there, allowing a shared file system the time to
        show files written on the nodes."""
        deadline = time.monotonic() + timeout
        while not jobfolder.results_present(payload_dir, self.world_size):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def _every_node_succeeded(self) -> bool:
        """Whether submitit has recorded a successful end on every node (it records nothing
        for an attempt that requeued the job)."""
        paths = [self._submitit_result(node)
                 for node in range(self.n_nodes)]
        return (all(path.is_file() for path in paths)
                and all(cloudpickle.loads(path.read_bytes())[0] == "success" for path in paths))

    def _submitit_result(self, node: int) -> Path:
        """Where submitit records how node ``node``'s task ended."""
        from submitit.core.utils import JobPaths

        return JobPaths(self._submitit_dir, self.job_id, node).result_pickle

    def _node_record(self, node: int) -> dict[str, Any]:
        return jobfolder.read_json(jobfolder.node_file(self.folder, node))

    def _node_errors(self) -> str:
        """The tracebacks that submitit recorded for the nodes that failed, and the end of what
        their torchrun agents logged (how a rank that said nothing ended)."""
        errors = []
        for node in range(self.n_nodes):
            result = self._submitit_result(node)
            if result.is_file():
                outcome, value = cloudpickle.loads(result.read_bytes())
                if outcome == "error":
                    errors.append(f"node {node}:\n{value}")
            agent = jobfolder.agent_log(self.folder, node)
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
