"""Where a job runs: the :class:`Platform` and its :class:`PlatformConfig`.

A :class:`PlatformConfig` only describes what the user asked for. What that means on the machine
at hand (which ``accelerate launch`` arguments, environment and ``Accelerator`` settings) is worked
out by :func:`ddpw.plan.resolve_plan`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ._checks import check_choice, check_int, check_type, fail
from .errors import ConfigError


class Platform(Enum):
    """The compute platforms ddpw runs on."""

    #: One or more CPU processes on this machine, joined in a ``gloo`` world when more than one.
    CPU = 0
    #: One or more CUDA GPUs on this machine, one process per GPU.
    GPU = 1
    #: A SLURM cluster, submitted through submitit: one or more nodes, GPUs or CPU processes each.
    SLURM = 2
    #: The Apple silicon GPU (Metal Performance Shaders): one process.
    MPS = 3

    @classmethod
    def parse(cls, value: Platform | str) -> Platform:
        """Return the platform for ``value``: a :class:`Platform` or its name in any case.

        :raises ConfigError: for anything else, listing the valid names.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        valid = ", ".join(f"Platform.{name}" for name in cls.__members__)
        raise ConfigError(f"PlatformConfig.platform={value!r} is not valid: one of {valid} "
                          f"(or their names as strings).")


MIXED_PRECISION = ("no", "fp16", "bf16")
#: What ``PlatformConfig.strategy`` may be (:mod:`ddpw.sharding`).
STRATEGIES = ("ddp", "fsdp")
#: What ``PlatformConfig.torch_compile_mode`` may be (:func:`torch.compile`'s ``mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Signals SLURM may send ahead of the end of a job; SIGTERM and SIGINT also stop it for good
#: (``scancel``, Ctrl-C), so they cannot mean "requeue".
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")

#: sbatch options that PlatformConfig fields set: ``slurm_parameters`` may not set them again.
_SLURM_OWN = {
    "job_name": "name", "nodes": "n_nodes", "ntasks_per_node": "n_procs / n_gpus",
    "cpus_per_task": "cpus_per_task", "gpus_per_node": "n_gpus", "partition": "partition",
    "time": "timeout_min", "mem": "mem_gb", "account": "account", "qos": "qos",
    "constraint": "constraint", "exclusive": "exclusive",
    "signal": "requeue_signal / signal_delay_s", "output": "the job's log folder",
    "error": "the job's log folder", "requeue": "ddpw (from the kind of job)",
    "no_requeue": "ddpw (from the kind of job)",
}


@dataclass
class PlatformConfig:
    """Where and how wide a job runs. Every field is checked when the config is made.

    :param name: the job's name (SLURM job name, log folder names).
    :param platform: a :class:`Platform` (or its name, ``"cpu"``). Not given (``None``), it is
        :attr:`Platform.GPU`, and the config then holds it; an error that the platform decides
        says that it was not given.
    :param n_nodes: number of machines. On SLURM, ddpw asks for them. On :attr:`Platform.CPU`
        and :attr:`Platform.GPU`, every machine runs the same command, each with its own
        ``node_rank``, and they meet at ``master_addr:master_port`` (torchrun's static
        rendezvous; :mod:`ddpw.rendezvous`). Left at 1, it is taken from the environment
        where that names a rendezvous (``PET_NNODES`` or ``NNODES``, as Kubernetes' training
        operators set them).
    :param node_rank: this machine's place among ``n_nodes`` (CPU and GPU), from 0 to
        ``n_nodes - 1``; node 0 holds the rendezvous and the main rank. ``None`` takes it from
        ``PET_NODE_RANK`` or ``NODE_RANK``.
    :param n_gpus: GPUs per node, one process each (GPU, and SLURM with GPUs). On SLURM, ``0`` asks
        for CPU processes only. Not given (``None``), it is ``0`` on SLURM when ``n_procs`` is
        given (CPU processes), and ``1`` otherwise; the config then holds the number chosen.
    :param n_procs: processes per node on CPUs (CPU, and SLURM with ``n_gpus=0``). Defaults to 1.
        On GPUs the number of processes is ``n_gpus``; a different ``n_procs`` is an error.
    :param cpus_per_task: CPU cores, and so compute threads (``OMP_NUM_THREADS``), per process.
        ``None`` splits this machine's cores evenly among the processes of a job of several,
        CPU or GPU, and leaves torch's default to a world of one. On SLURM, ``None`` asks for
        8 cores per GPU process, or a node's cores divided by its GPUs where that is fewer
        (at least 1), and 1 core per CPU process. A number that is given is used as given.
    :param partition: SLURM partition.
    :param timeout_min: SLURM time limit in minutes.
    :param mem_gb: SLURM memory per node in GiB; ``None`` leaves the partition's default.
    :param account: SLURM account to charge (``sbatch --account``).
    :param qos: SLURM quality of service (``sbatch --qos``).
    :param constraint: SLURM node features required (``sbatch --constraint``).
    :param exclusive: SLURM nodes not shared with other jobs (``sbatch --exclusive``).
    :param slurm_parameters: any other ``sbatch`` option, ``{"mail_type": "END"}`` for
        ``--mail-type=END``; ``True`` gives a bare flag. An option that a field above sets, or
        that ddpw sets itself (``requeue``), is refused.
    :param requeue_signal: the signal SLURM sends ahead of a preemption or the time limit
        (``sbatch --signal``): a :class:`~ddpw.trainer.Trainer` pauses at the next step boundary
        and the job requeues itself and resumes from that checkpoint. It must be one of the
        Trainer's ``pause_signals``.
    :param signal_delay_s: how many seconds before the time limit SLURM sends
        ``requeue_signal``: enough to finish a step and write a checkpoint.
    :param requeue_limit: how many times a job may requeue itself; one more preemption or time
        limit ends it with an error naming its last checkpoint.
    :param seed: seeds Python, NumPy and torch on every rank as the job starts (offset by the
        rank, so that dropout differs across ranks) and the data order (the same on every rank,
        so shards never overlap). It does not seed what the calling script does before the job,
        such as building ``ArtefactsConfig.model``: to start from the same weights every run,
        build the model after ``torch.manual_seed(...)``.
    :param master_addr: the host name or address of node 0, where the nodes of a job on several
        machines (CPU, GPU) meet; ``None`` takes ``PET_MASTER_ADDR`` or ``MASTER_ADDR``. A job
        on one machine meets on this machine, and a SLURM job on its first node, whose address
        ddpw asks SLURM for: neither needs it.
    :param master_port: the port of the rendezvous. On one machine, ``None`` (the default) lets
        it bind a free port, so two jobs on one machine never collide. On several machines,
        ``None`` takes ``PET_MASTER_PORT`` or ``MASTER_PORT``, else torch's 29500. A fixed
        number is used as given.
    :param rendezvous_timeout_s: how long the nodes of a job on several machines (CPU, GPU)
        wait for each other at the start before the job fails, naming how many arrived.
    :param min_nodes: makes a job on several machines (CPU, GPU) elastic: it starts with
        between ``min_nodes`` and ``n_nodes`` machines (torchrun's c10d rendezvous, whose id
        is ``name``), and when a machine dies or leaves, the others go on as a smaller world
        (a :class:`~ddpw.trainer.Trainer` resumes from its newest checkpoint at the new world
        size), up to ``max_restarts`` times. ``node_rank`` is then optional: the rendezvous
        numbers the machines. ``None`` (the default): a fixed set of ``n_nodes`` machines.
    :param rendezvous_last_call_s: in an elastic job, how long the machines wait for more to
        arrive once ``min_nodes`` are there, at the start and at every restart (torch's own
        default is 30 s). A machine that arrives later is not lost: the job's processes end and
        meet again as a larger world, which a Trainer begins at its newest checkpoint.
    :param max_restarts: how many times the processes of a job on several machines start
        again after a failure or a lost machine (torchrun's ``--max-restarts``). A function
        restarts only if it is marked :func:`~ddpw.utils.restartable`.
    :param hang_timeout_s: how many seconds a rank of a job of several processes may go
        without progress while the others wait for it, before ddpw calls the job hung: it
        writes every rank's stack to that rank's log, ends every process on every node and
        raises :class:`~ddpw.errors.JobHung`, naming the stuck rank(s), their host and where
        they stood (:mod:`ddpw.hang`; the troubleshooting guide shows a report). Progress is a
        Trainer's steps and evaluation batches, or a call of :func:`ddpw.utils.heartbeat`.
        Never a hang: a checkpoint being written, however long, and the time before every rank
        has ended its first unit of the work it is in (set-up, a first step, a first
        evaluation batch), which torch's own collective timeouts judge (or one of the
        caller's: ``InitProcessGroupKwargs``), as they judge a script that never reports
        progress. The process groups' timeouts are never shortened: ``T`` longer than torch's
        lengthens them. ``T`` must exceed the longest that one rank may lag another at a
        collective once the job runs at its pace. ``None`` turns the watch off. A world of one
        process is never watched, nor is a job that runs inside a launch of the caller's own.
    :param strategy: how a :class:`~ddpw.trainer.Trainer`'s model is spread over the ranks:
        ``"ddp"`` (the default), every rank holds the whole model and the gradients are
        averaged; ``"fsdp"``, the parameters, gradients and optimiser state are sharded across
        every rank of the job, every node included, with FSDP2, on CPUs and GPUs alike, so
        that a model too large for one device trains (:mod:`ddpw.sharding`; the guide
        :doc:`/guides/sharding`). A world of one process has nothing to shard: it trains as
        one process, with a warning. A script that ``ddpw-launch`` runs gets Accelerate's own
        FSDP2 on GPUs; Accelerate has none on CPUs.
    :param shard_units: with ``strategy="fsdp"``, the classes (or their names) of the blocks
        that are each gathered as one unit, such as a transformer's layer class;  ``None``
        (the default) takes the items of the model's largest ``ModuleList`` (else
        ``Sequential``). The root is always a unit, for what the units leave.
    :param mixed_precision: ``"no"``, ``"fp16"`` (CUDA only) or ``"bf16"``. Under
        ``strategy="fsdp"``, the units compute in that dtype and reduce their gradients in
        float32 (FSDP2's policy), instead of Accelerate's autocast.
    :param torch_compile: compile the model with :func:`torch.compile` (TorchInductor), through
        Accelerate's dynamo plugin, on every rank, after DDP wraps it; a script that
        ``ddpw-launch`` runs gets it as ``accelerate launch --dynamo_backend inductor``.
        The first steps, and the first evaluation, take longer while it compiles; on the CPU
        it needs a C++ compiler (on ``Platform.CPU``, checked before launch; on a SLURM
        node or a GPU, where Triton needs a C compiler, it is not). Checkpoints hold the plain
        model's weights either way, so a compiled run resumes an uncompiled one's checkpoint
        and the other way round.
    :param torch_compile_mode: :func:`torch.compile`'s ``mode``: one of ``"default"``,
        ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``,
        ``"max-autotune-no-cudagraphs"``.
    :param verbose: print ddpw's own summary and progress bars; ``False`` silences them (the job's
        own output is untouched).
    """

    name: str = "DDPW"
    platform: Platform | None = None
    n_nodes: int = 1
    node_rank: int | None = None
    n_gpus: int | None = None
    n_procs: int | None = None
    cpus_per_task: int | None = None
    partition: str = "general"
    timeout_min: int = 2880
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    slurm_parameters: dict[str, Any] = field(default_factory=dict)
    requeue_signal: str = "SIGUSR2"
    signal_delay_s: int = 90
    requeue_limit: int = 10
    seed: int = 1889
    master_addr: str | None = None
    master_port: int | None = None
    rendezvous_timeout_s: int = 600
    min_nodes: int | None = None
    rendezvous_last_call_s: int = 10
    max_restarts: int = 0
    hang_timeout_s: float | None = 300.0
    strategy: str = "ddp"
    shard_units: tuple[str, ...] | None = None
    mixed_precision: str = "no"
    torch_compile: bool = False
    torch_compile_mode: str = "default"
    verbose: bool = True

    def __post_init__(self) -> None:
        owner = "PlatformConfig"
        given = self.platform is not None
        self.platform = Platform.parse(Platform.GPU if self.platform is None else self.platform)
        check_type(owner, "name", self.name, str, "a string")
        check_int(owner, "n_nodes", self.n_nodes, 1)
        if self.n_gpus is None:
            # Asking SLURM for CPU processes, and not for GPUs, means CPU processes alone.
            cpu_slurm = self.platform is Platform.SLURM and self.n_procs is not None
            self.n_gpus = 0 if cpu_slurm else 1
        check_int(owner, "n_gpus", self.n_gpus, 0)
        check_int(owner, "n_procs", self.n_procs, 1, optional=True)
        check_int(owner, "cpus_per_task", self.cpus_per_task, 1, optional=True)
        check_type(owner, "partition", self.partition, str, "a string")
        check_int(owner, "timeout_min", self.timeout_min, 1)
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool)
                                        or not isinstance(self.mem_gb, (int, float))
                                        or not 0 < self.mem_gb < math.inf):
            fail(owner, "mem_gb", self.mem_gb, "a positive number of GiB or None")
        for name in ("account", "qos", "constraint"):
            check_type(owner, name, getattr(self, name), (str, type(None)), "a string or None")
        check_type(owner, "exclusive", self.exclusive, bool, "True or False")
        self._check_slurm_parameters()
        if self.requeue_signal not in REQUEUE_SIGNALS:
            fail(owner, "requeue_signal", self.requeue_signal, "one of " + ", ".join(
                repr(name) for name in REQUEUE_SIGNALS))
        check_int(owner, "signal_delay_s", self.signal_delay_s, 1)
        if self.platform is Platform.SLURM and self.signal_delay_s >= self.timeout_min * 60:
            fail(owner, "timeout_min", self.timeout_min,
                 f"more than signal_delay_s={self.signal_delay_s} seconds: SLURM sends "
                 f"{self.requeue_signal} that long before the time limit, to pause the job")
        check_int(owner, "requeue_limit", self.requeue_limit, 0)
        check_int(owner, "seed", self.seed, 0)
        rank = self.node_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or not 0 <= rank < self.n_nodes):
            fail(owner, "node_rank", rank, f"an integer from 0 to {self.n_nodes - 1} "
                 f"(n_nodes={self.n_nodes}), or None")
        check_type(owner, "master_addr", self.master_addr, (str, type(None)),
                   "a host name or IP address, or None")
        if self.master_addr is not None and not self.master_addr.strip():
            fail(owner, "master_addr", self.master_addr, "a host name or IP address, or None")
        check_int(owner, "master_port", self.master_port, 1, optional=True, maximum=65535)
        check_int(owner, "rendezvous_timeout_s", self.rendezvous_timeout_s, 1)
        check_int(owner, "max_restarts", self.max_restarts, 0)
        check_int(owner, "rendezvous_last_call_s", self.rendezvous_last_call_s, 0)
        low = self.min_nodes
        if low is not None and (isinstance(low, bool) or not isinstance(low, int)
                                or not 1 <= low <= self.n_nodes):
            fail(owner, "min_nodes", low, f"an integer from 1 to n_nodes={self.n_nodes} (the "
                 f"fewest machines, at most the most), or None")
        timeout = self.hang_timeout_s
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < math.inf):
            fail(owner, "hang_timeout_s", timeout,
                 "a positive number of seconds, or None to watch for no hang")
        check_choice(owner, "strategy", self.strategy, STRATEGIES)
        self._check_shard_units()
        check_choice(owner, "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_type(owner, "torch_compile", self.torch_compile, bool, "True or False")
        check_choice(owner, "torch_compile_mode", self.torch_compile_mode, COMPILE_MODES)
        check_type(owner, "verbose", self.verbose, bool, "True or False")
        self._check_shape(platform_given=given)

    def _check_shard_units(self) -> None:
        units, valid = self.shard_units, ("None, or a list of the model's block classes (or "
                                          "their names), such as ['TransformerBlock']")
        if units is None:
            return
        if isinstance(units, (str, type)) or not isinstance(units, (list, tuple)) or not units:
            fail("PlatformConfig", "shard_units", units, valid)
        if not all(isinstance(u, type) or (isinstance(u, str) and u) for u in units):
            fail("PlatformConfig", "shard_units", units, valid)
        if self.strategy != "fsdp":
            fail("PlatformConfig", "shard_units", units,
                 f"None with strategy={self.strategy!r}: units are what strategy='fsdp' shards")
        # Names travel to every rank and into logs; a class is named by its own name.
        self.shard_units = tuple(u.__name__ if isinstance(u, type) else u for u in units)

    def _check_slurm_parameters(self) -> None:
        owner, given = "PlatformConfig", self.slurm_parameters
        valid = ("a dict of sbatch options without their dashes, such as {'mail_type': 'END'}, "
                 "with str, int, float or True values")
        if not isinstance(given, dict):
            fail(owner, "slurm_parameters", given, valid)
        for key, value in given.items():
            if not (isinstance(key, str) and re.fullmatch(r"[a-z][a-z0-9_-]*", key)
                    and isinstance(value, (str, int, float)) and value is not False):
                fail(owner, "slurm_parameters", given, valid)
            if key.replace("-", "_") in _SLURM_OWN:
                fail(owner, "slurm_parameters", given,
                     f"options other than ddpw's own ({key!r} comes from "
                     f"{_SLURM_OWN[key.replace('-', '_')]})")

    def _check_shape(self, platform_given: bool) -> None:
        owner, p = "PlatformConfig", self.platform
        # Where the platform decides, the message names it, and says when the user never chose it.
        named = f"{p}" if platform_given else f"{p} (the platform when none is given)"
        if self.n_nodes > 1 and p is Platform.MPS:
            fail(owner, "n_nodes", self.n_nodes,
                 "1 on Platform.MPS; several machines need Platform.CPU, Platform.GPU or "
                 "Platform.SLURM")
        if self.min_nodes is not None and p not in (Platform.CPU, Platform.GPU):
            fail(owner, "min_nodes", self.min_nodes, f"None on {p}: elastic jobs run on "
                 f"Platform.CPU or Platform.GPU machines")
        if self.node_rank is not None and p is Platform.SLURM:
            fail(owner, "node_rank", self.node_rank, "None on Platform.SLURM, where SLURM "
                 "numbers the nodes")
        if p is Platform.GPU and self.n_gpus < 1:
            fail(owner, "n_gpus", self.n_gpus, f"at least 1 on {named}; for CPU processes: "
                 f"PlatformConfig(platform=Platform.CPU, n_procs=N)")
        if p is Platform.MPS and (self.n_gpus != 1 or self.n_procs not in (None, 1)):
            wrong = ("n_gpus", self.n_gpus) if self.n_gpus != 1 else ("n_procs", self.n_procs)
            fail(owner, *wrong, "1 on Platform.MPS: Apple silicon has one GPU and "
                 "PyTorch runs one process on it")
        if self.uses_gpus and self.n_procs not in (None, self.n_gpus):
            procs = self.n_procs
            cpu = (f"PlatformConfig(platform=Platform.SLURM, n_gpus=0, n_procs={procs})"
                   if p is Platform.SLURM else
                   f"PlatformConfig(platform=Platform.CPU, n_procs={procs})")
            fail(owner, "n_procs", procs, f"{named} runs one process per GPU, and "
                 f"n_gpus={self.n_gpus} sets their number. For {procs} CPU processes: {cpu}")
        if self.mixed_precision == "fp16" and not self.uses_gpus:
            fail(owner, "mixed_precision", "fp16", f"'no' or 'bf16' on {p}: fp16 needs CUDA")

    @property
    def procs_per_node(self) -> int:
        """Processes started on each node."""
        if self.uses_gpus:
            return self.n_gpus
        return self.n_procs or 1

    @property
    def world_size(self) -> int:
        """Total number of processes: ``n_nodes * procs_per_node``."""
        return self.n_nodes * self.procs_per_node

    @property
    def uses_gpus(self) -> bool:
        """Whether the processes run on CUDA GPUs."""
        slurm_gpus = self.platform is Platform.SLURM and self.n_gpus > 0
        return self.platform is Platform.GPU or slurm_gpus

    def summary(self) -> str:
        """One line describing the platform, for logs."""
        where = {Platform.CPU: "CPU", Platform.GPU: "CUDA GPU", Platform.MPS: "MPS",
                 Platform.SLURM: "SLURM"}[self.platform]
        unit = "GPU" if self.uses_gpus else "process"
        return (f"{self.name}: {where}, {self.n_nodes} node(s) x {self.procs_per_node} {unit}(s) = "
                f"world of {self.world_size}, mixed precision {self.mixed_precision}, "
                f"seed {self.seed}")
