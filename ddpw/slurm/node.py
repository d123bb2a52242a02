"""The node side: :class:`NodeTask` is what submitit runs on each node of the allocation, one
``accelerate launch`` of this node's processes, and the requeue that follows SLURM's warning.

Preemption and the time limit: SLURM sends ``requeue_signal`` ahead of both. A Trainer pauses
on it (every rank stops at the same step and a checkpoint is written); the node that holds rank
0 then requeues the job, which starts again from that checkpoint, by itself. Node 0 begins each
attempt: it clears the last attempt's reports and chooses the checkpoint, which every node then
reads from ``attempt-K.json`` (:mod:`ddpw.jobfolder`), so that all of them resume from the same
one.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

from .. import environment, jobfolder, network
from ..errors import PAUSED_EXIT_STATUS
from ..goodput import launch_environment
from ..launcher import Logs, launch_env, run_accelerate
from ..outcome import Outcome
from ..plan import LaunchPlan, rendezvous_port
from ..process import FORWARDED, forwarding


class RequeuePolicy(enum.Enum):
    """What a job does when SLURM warns of a preemption or the time limit."""

    #: A Trainer, or a script: the requeue signal is passed on to the processes, and a job that
    #: paused on it requeues.
    PAUSES = "pauses"
    #: A function marked :func:`~ddpw.utils.restartable`: the processes are ended and the job
    #: requeues, to start the function again.
    RESTARTS = "restarts"
    #: A function: it runs on until SLURM ends it, and the job never requeues.
    RUNS_ON = "runs on"


@dataclasses.dataclass(frozen=True)
class NodeTask:
    """What submitit runs on each node of the allocation: this node's processes of the job.

    :param folder: the job's folder.
    :param plan: the job's plan; each node adds its rank and the rendezvous to it.
    :param entry: what every process runs (``--module ddpw.entry ...``).
    :param policy: what the job does on the requeue signal.
    :param requeue_limit: how many times the job may requeue itself.
    :param requeue_signal: the signal that SLURM sends ahead of a preemption or the time limit.
    """

    folder: str
    plan: LaunchPlan
    entry: tuple[str, ...]
    policy: RequeuePolicy
    requeue_limit: int
    requeue_signal: str

    def __call__(self) -> None:
        # Each attempt of the job is a launch of its own time, of the job's id (ddpw.goodput).
        launched = launch_environment(os.environ["SLURM_JOB_ID"])
        sig = getattr(signal, self.requeue_signal)
        asked: list[signal.Signals] = []
        # From now on the signal is ddpw's, never submitit's: submitit would requeue the job
        # itself, past the limit, and without a checkpoint.
        signal.signal(sig, lambda signum, frame: self._asked(asked))
        folder, node = Path(self.folder), int(os.environ["SLURM_NODEID"])
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        start = (self._begin_attempt(folder, attempt) if node == 0 else
                 jobfolder.await_json(jobfolder.attempt_file(folder, attempt)))
        env = {environment.CHECKPOINT_RECORD: str(jobfolder.checkpoint_record(folder)),
               environment.REQUEUE_SIGNAL: self.requeue_signal,
               environment.NODE_RUNNER: str(os.getpid()), **launched}
        if start["resume"] is not None:
            env[environment.RESUME_FROM] = start["resume"]
            if node == 0:
                print(f"[ddpw] attempt {attempt + 1}: resuming from {start['resume']}", flush=True)
        missing = self._missing_gpus()
        if missing:
            jobfolder.write_json(jobfolder.node_file(folder, node), {
                "attempt": attempt, "requeued": False, "refused": missing, "failures": {}})
            raise RuntimeError(missing)
        procs = self.plan.world_size // self.plan.slurm["nodes"]
        outcome = self._run(node, start["port"], env,
                            Logs(folder, first_rank=node * procs, node=node), sig)
        requeue = (bool(asked) or sig in outcome.received) and self._requeues(outcome, sig)
        refused = None
        if requeue and node == 0:
            newest = jobfolder.newest_checkpoint(jobfolder.checkpoint_record(folder))
            refused = self._requeue(attempt, newest)
        jobfolder.write_json(jobfolder.node_file(folder, node), {
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
        if self.policy is RequeuePolicy.RESTARTS:
            _signal_children(signal.SIGTERM)
        elif self.policy is RequeuePolicy.RUNS_ON:
            print(f"[ddpw] {self.requeue_signal} from SLURM (preemption or time limit): this "
                  f"function is not marked ddpw.restartable, so it runs on until SLURM ends it",
                  file=sys.stderr, flush=True)

    def _begin_attempt(self, folder: Path, attempt: int) -> dict[str, Any]:
        """On node 0: clear what the last attempt's processes left, choose the checkpoint to
        resume from and the rendezvous port, and tell the other nodes (``attempt-K.json``)."""
        jobfolder.clear_attempt(folder)
        record = jobfolder.checkpoint_record(folder)
        # The job's own port, unless something on this node holds it: then the other nodes
        # would wait for a rendezvous that never opens.
        port = network.bindable_port(rendezvous_port(os.environ["SLURM_JOB_ID"]))
        start = {"attempt": attempt, "port": port,
                 "resume": jobfolder.newest_checkpoint(record) if attempt else None}
        jobfolder.write_json(jobfolder.attempt_file(folder, attempt), start)
        return start

    def _run(self, node: int, port: int, env: dict[str, str], logs: Logs,
             sig: signal.Signals) -> Outcome:
        """Run this node's processes and return how they ended."""
        plan = dataclasses.replace(self.plan, env={**self.plan.env, **env})
        # A Trainer (or a script) pauses on the signal; a function's node runner handles it.
        forward = (FORWARDED if self.policy is RequeuePolicy.PAUSES else
                   tuple(s for s in FORWARDED if s != sig))
        if plan.world_size == 1:
            return run_single(plan, list(self.entry), logs, forward)
        plan = dataclasses.replace(plan, launch_args=(
            *plan.launch_args, "--machine_rank", str(node), "--main_process_ip", main_address(),
            "--main_process_port", str(port)))
        return run_accelerate(plan, list(self.entry), logs, forward)

    def _requeues(self, outcome: Outcome, sig: signal.Signals) -> bool:
        """Whether the job requeues after SLURM's signal: its processes paused (a Trainer), or
        were ended by the node runner (a restartable function)."""
        if self.policy is RequeuePolicy.RESTARTS:
            statuses = {status for status, _ in outcome.failures.values()}
            return bool(statuses) and statuses <= {-signal.SIGTERM, -sig}
        return self.policy is RequeuePolicy.PAUSES and outcome.paused

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


def _signal_children(sig: signal.Signals) -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(sig)
        except psutil.Error:
            pass


def run_single(plan: LaunchPlan, entry: list[str], logs: Logs,
               forward: tuple[signal.Signals, ...]) -> Outcome:
    """A world of one: ``accelerate launch`` wants two processes or more for a distributed
    launch, so the process is started directly, its output kept as a launched rank's is."""
    with forwarding(forward) as received:
        process = subprocess.Popen([sys.executable, "-m", *entry[1:]],
                                   env={**os.environ, **launch_env(plan.env)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        copies = [threading.Thread(target=_tee, args=(
            stream, jobfolder.rank_log(logs.folder, 0, name), console))
            for stream, name, console in ((process.stdout, "stdout", sys.stdout),
                                          (process.stderr, "stderr", sys.stderr))]
        for copy in copies:
            copy.start()
        status = process.wait()
        for copy in copies:
            copy.join()
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
