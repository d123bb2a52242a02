"""From a :class:`~ddpw.platform.PlatformConfig` to a launch plan, without side effects.

:func:`resolve_plan` is a pure function of the config and of :class:`MachineFacts`, so every
platform's plan can be tested as data, including GPU and MPS plans on a machine that has neither.
(Its one side effect is a warning, when more processes than cores are to share this machine.)
:mod:`ddpw.launcher` carries a plan out.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import environment, rendezvous
from .errors import ConfigError
from .platform import Platform, PlatformConfig
from .rendezvous import Rendezvous

#: Variables that ``torchrun``, ``accelerate launch`` and ``ddpw-launch`` give every process.
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")

#: Cores, and so compute threads, that a SLURM job asks for each GPU process when
#: ``PlatformConfig.cpus_per_task`` is not given; fewer at submission where a node of the
#: partition has fewer cores per GPU (:func:`ddpw.slurm.cluster.fit_cores`).
SLURM_CORES_PER_GPU = 8


@dataclass(frozen=True)
class MachineFacts:
    """What resolving a plan needs to know about the machine it runs on.

    :param cuda_devices: CUDA devices visible to this process.
    :param mps_available: whether an Apple MPS device is usable.
    :param cpu_count: cores this process may run on.
    :param env: the environment variables.
    :param parent_pid: the process id of this process's parent.
    :param pid: this process's id.
    :param cxx_compiler: the C++ compiler that TorchInductor would compile CPU code with
        (``$CXX``, else ``g++``, ``c++`` or ``clang++`` on ``PATH``), or ``None``.
    """

    cuda_devices: int
    mps_available: bool
    cpu_count: int
    env: Mapping[str, str] = field(default_factory=dict)
    parent_pid: int = 0
    pid: int = 0
    cxx_compiler: str | None = None

    @classmethod
    def probe(cls) -> MachineFacts:
        """The facts of this machine and process.

        The CUDA and MPS devices are torch's answer wherever a GPU driver is present
        (:func:`gpu_driver_present`: an NVIDIA, ROCm or WSL driver, or macOS). Elsewhere torch
        could find none, and it is not imported for the question: ``ddpw-launch --dry-run``
        stays light.
        """
        cuda, mps = _torch_devices() if gpu_driver_present() else (0, False)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        compilers = (os.environ.get("CXX"), "g++", "c++", "clang++")
        cxx = next((found for name in compilers if name and (found := shutil.which(name))), None)
        return cls(cuda_devices=cuda, mps_available=mps, cpu_count=cores or 1, env=dict(os.environ),
                   parent_pid=os.getppid(), pid=os.getpid(), cxx_compiler=cxx)


def gpu_driver_present() -> bool:
    """Whether this machine has a driver through which torch might reach a GPU: NVIDIA's
    (``/proc/driver/nvidia``, which the kernel shows in every container, or its
    ``/dev/nvidiactl``), ROCm's (``/dev/kfd``, which torch.cuda counts too), WSL's (``/dev/dxg``,
    where NVIDIA's is not in ``/proc``), or any system but Linux (macOS's MPS)."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(path) for path in ("/proc/driver/nvidia", "/dev/nvidiactl",
                                                 "/dev/kfd", "/dev/dxg"))


def _torch_devices() -> tuple[int, bool]:
    """The CUDA devices visible to this process, and whether an MPS device is usable."""
    import torch

    # device_count() asks NVML, which leaves CUDA uninitialised here, so that this process
    # may still fork children that use CUDA; is_available() would run cuInit. Where NVML
    # cannot answer (no NVML library, MIG devices named by UUID), torch counts with the
    # CUDA runtime instead, which does initialise CUDA: children forked after that fail as
    # soon as they use CUDA, while processes started afresh (spawn, ddpw's) do not.
    cuda = torch.cuda.device_count()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return cuda, mps


class LaunchMode(Enum):
    """How a plan runs the job."""

    #: A world of one process: the job runs in the calling process.
    IN_PROCESS = "in_process"
    #: The caller is already one rank of a distributed launch: the job runs here, on every rank.
    IN_PLACE = "in_place"
    #: ``accelerate launch`` starts this machine's worker processes: all ``world_size`` of
    #: them, or this node's share of a job on several machines (:mod:`ddpw.rendezvous`).
    ACCELERATE = "accelerate"
    #: A SLURM job (through submitit) runs one ``accelerate launch`` on each of its nodes.
    SLURM = "slurm"


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start a job, as data.

    :param mode: how the job runs (:class:`LaunchMode`).
    :param platform: the platform the plan was made for.
    :param world_size: total number of processes.
    :param threads_per_process: compute threads for each process, or ``None`` to leave torch's
        default.
    :param accelerator_kwargs: keyword arguments for :class:`accelerate.Accelerator` on every rank.
    :param env: variables added to the environment of the processes that run the job (for a
        world of one that ``ddpw-launch`` runs in its own process, the script's).
    :param launch_args: ``accelerate launch`` options (``--config_file`` and the entry point are
        added by :meth:`accelerate_args`).
    :param accelerate_config: the Accelerate config file that ddpw writes for the launch. It
        holds the settings without a command-line flag (mixed precision, CPU), and it keeps a
        leftover ``accelerate config`` default on the machine from changing the launch.
    :param standalone: let torchrun's agent bind a free port for the rendezvous itself (its
        ``--standalone`` mode), so that jobs started at the same time cannot race for a port.
    :param srun_env: the caller is one task of a multi-task ``srun`` step, and the process-group
        variables are derived from SLURM's before the job runs in place.
    :param slurm: for :attr:`LaunchMode.SLURM`, the parameters of submitit's executor (one task
        per node, whose ``accelerate launch`` adds ``--machine_rank``, ``--main_process_ip``
        and ``--main_process_port`` on the node).
    :param rendezvous: for a job on several machines without SLURM, how this one meets the
        others; its ``accelerate launch`` starts this node's processes alone.
    """

    mode: LaunchMode
    platform: Platform
    world_size: int
    threads_per_process: int | None
    accelerator_kwargs: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    launch_args: tuple[str, ...] = ()
    accelerate_config: dict[str, Any] = field(default_factory=dict)
    standalone: bool = False
    srun_env: bool = False
    slurm: dict[str, Any] = field(default_factory=dict)
    rendezvous: Rendezvous | None = None

    @property
    def first_rank(self) -> int:
        """The global rank of this machine's first process. In an elastic job the
        rendezvous numbers the machines, anew at each restart: there this is only the
        configured node rank's share, which numbers this machine's log files."""
        if self.rendezvous is None:
            return 0
        return self.rendezvous.node_rank * (self.world_size // self.rendezvous.nodes)

    def without_restarts(self) -> LaunchPlan:
        """The same plan, with no restart of the processes after a failure or a lost machine
        (for a function that is not :func:`~ddpw.utils.restartable`)."""
        if self.rendezvous is None or not self.rendezvous.max_restarts:
            return self
        args = list(self.launch_args)
        args[args.index("--max_restarts") + 1] = "0"
        return dataclasses.replace(self, launch_args=tuple(args), rendezvous=dataclasses.replace(
            self.rendezvous, max_restarts=0))

    def accelerate_args(self, config_file: str, entry: list[str]) -> list[str]:
        """The arguments of ``accelerate launch`` that start ``entry`` on every process."""
        return ["--config_file", config_file, *self.launch_args, *entry]

    def command(self, config_file: str, entry: list[str]) -> list[str]:
        """The same launch as a command line, to show or to run in a shell."""
        return [sys.executable, "-m", "accelerate.commands.launch",
                *self.accelerate_args(config_file, entry)]


def resolve_plan(config: PlatformConfig, facts: MachineFacts, *,
                 for_this_machine: bool = True) -> LaunchPlan:
    """Work out how to run a job described by ``config`` on the machine described by ``facts``.

    :param for_this_machine: ``False`` for a plan that another machine is to run (a dry run
        prepares one): what this machine lacks (:func:`shortfall`) does not refuse it.
    :raises ConfigError: when the machine cannot run what ``config`` asks for, with what to change.
    """
    launch = _launch_around(facts.env, facts.parent_pid, facts.pid)
    lacking = shortfall(config, facts, in_place=launch is not None)
    if lacking is not None and for_this_machine:
        raise ConfigError(lacking[1])
    cpu_slurm = config.platform is Platform.SLURM and not config.uses_gpus
    accelerator_kwargs: dict[str, Any] = {
        "cpu": config.platform is Platform.CPU or cpu_slurm,
        "mixed_precision": config.mixed_precision,
    }
    if config.torch_compile:
        # As data, which the worker makes Accelerate's TorchDynamoPlugin of.
        accelerator_kwargs["dynamo_plugin"] = {"backend": "inductor",
                                               "mode": config.torch_compile_mode}
    if config.strategy == "fsdp" and config.world_size == 1:
        warnings.warn(f"PlatformConfig.strategy='fsdp' with one process on {config.platform}: "
                      f"nothing to shard; the model trains whole, as under 'ddp'.", stacklevel=2)
    if launch is not None:
        # The launch's world, whatever the config asks for: Wrapper.start warns when they differ.
        world_size, srun_env = launch
        return LaunchPlan(mode=LaunchMode.IN_PLACE, platform=config.platform,
                          world_size=world_size, threads_per_process=config.cpus_per_task,
                          accelerator_kwargs=accelerator_kwargs, srun_env=srun_env)

    if config.platform is Platform.SLURM:
        return _slurm_plan(config, accelerator_kwargs)
    meeting = rendezvous.of(config, facts.env)
    procs = config.procs_per_node
    threads = config.cpus_per_task
    if threads is None and procs > 1 and (config.platform is Platform.CPU
                                           or "OMP_NUM_THREADS" not in facts.env):
        # GPU processes too: torchrun's default of one thread each starves their data loading
        # (unless the user chose OMP_NUM_THREADS, which torchrun then keeps).
        threads = max(1, facts.cpu_count // procs)
    if procs > facts.cpu_count:
        # Not an error (a test of several ranks on a laptop is fine), but slow: said once.
        threads_each = "" if threads is None else f", {threads} compute thread(s) each"
        warnings.warn(f"{procs} processes share this machine's {facts.cpu_count} core(s)"
                      f"{threads_each}: they take turns, each slower than it would run alone.",
                      stacklevel=2)
    if procs == 1 and meeting is None:
        # The environment matters only to a script that ddpw-launch runs in this process, whose
        # own Accelerator() must then take the platform's settings.
        script_env = {"ACCELERATE_MIXED_PRECISION": config.mixed_precision,
                      **_dynamo_env(config)}
        if config.platform is Platform.CPU:
            script_env["ACCELERATE_USE_CPU"] = "1"
        return LaunchPlan(mode=LaunchMode.IN_PROCESS, platform=config.platform, world_size=1,
                          threads_per_process=config.cpus_per_task,
                          accelerator_kwargs=accelerator_kwargs, env=script_env)

    port = config.master_port if config.master_port is not None else 0
    worker_env = {"OMP_NUM_THREADS": str(threads)} if threads is not None else {}
    worker_env[environment.HANG_TIMEOUT] = _hang_timeout(config)
    worker_env |= {k: v for k, v in _allocator_env(config).items() if k not in facts.env}
    if config.platform is Platform.CPU:
        # With the CPU flag, torchrun's path gives one gloo world (MULTI_CPU); accelerate's own
        # `--cpu` would start a single process.
        worker_env["ACCELERATE_USE_CPU"] = "1"
    # No --mixed_precision flag: with it, accelerate's checks initialise CUDA in the caller
    # (is_bf16_available), which the config file's setting does not.
    world_size = procs * (meeting.nodes if meeting else 1)
    where = (meeting.launch_args() if meeting else
             ("--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(port)))
    launch_args = ("--multi_gpu", "--num_processes", str(world_size), *where,
                   *_dynamo_args(config))
    # Only the fields without a default: every other setting comes from the flags above or from
    # Accelerate's own defaults, never from a config file left on the machine.
    accelerate_config = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
        "mixed_precision": config.mixed_precision, "use_cpu": config.platform is Platform.CPU,
        "debug": False,
    }
    return LaunchPlan(mode=LaunchMode.ACCELERATE, platform=config.platform,
                      world_size=world_size, threads_per_process=threads,
                      accelerator_kwargs=accelerator_kwargs, env=worker_env,
                      launch_args=launch_args, accelerate_config=accelerate_config,
                      standalone=meeting is None and config.master_port is None,
                      rendezvous=meeting)


def _slurm_plan(config: PlatformConfig, accelerator_kwargs: dict[str, Any]) -> LaunchPlan:
    """One SLURM task per node, holding a core per thread of each of its processes."""
    procs = config.procs_per_node
    threads = config.cpus_per_task or (SLURM_CORES_PER_GPU if config.uses_gpus else 1)
    slurm: dict[str, Any] = {
        "name": config.name, "nodes": config.n_nodes, "tasks_per_node": 1,
        "cpus_per_task": procs * threads, "timeout_min": config.timeout_min,
        "slurm_partition": config.partition,
    }
    if config.uses_gpus:
        slurm["gpus_per_node"] = config.n_gpus
    if config.mem_gb is not None:
        slurm["mem_gb"] = config.mem_gb
    for name in ("account", "qos", "constraint"):
        if getattr(config, name) is not None:
            slurm[f"slurm_{name}"] = getattr(config, name)
    if config.exclusive:
        slurm["slurm_exclusive"] = True
    # submitit asks for SIGUSR2 unless told otherwise, on both sides of the job.
    sig = config.requeue_signal.removeprefix("SIG")
    slurm["slurm_signal_delay_s"] = config.signal_delay_s
    slurm["slurm_additional_parameters"] = {"signal": f"{sig}@{config.signal_delay_s}",
                                            **config.slurm_parameters}
    slurm["slurm_setup"] = [f"export SUBMITIT_PREEMPT_SIGNAL={sig}"]
    # A node that fails (its launch could not start, its processes failed) ends the others',
    # which would otherwise wait for it at the rendezvous or in a collective.
    slurm["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    # A world of one is started without accelerate launch, whose config would give a plain
    # Accelerator() its mixed precision: the environment gives it, to every process alike.
    env = {"OMP_NUM_THREADS": str(threads), "ACCELERATE_MIXED_PRECISION": config.mixed_precision,
           environment.HANG_TIMEOUT: _hang_timeout(config), **_dynamo_env(config),
           **_allocator_env(config)}
    if not config.uses_gpus:
        env["ACCELERATE_USE_CPU"] = "1"
    launch_args = ("--multi_gpu", "--num_processes", str(config.world_size),
                   "--num_machines", str(config.n_nodes), *_dynamo_args(config))
    accelerate_config = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
        "mixed_precision": config.mixed_precision, "use_cpu": not config.uses_gpus,
        "debug": False,
    }
    return LaunchPlan(mode=LaunchMode.SLURM, platform=Platform.SLURM,
                      world_size=config.world_size, threads_per_process=threads,
                      accelerator_kwargs=accelerator_kwargs, env=env, launch_args=launch_args,
                      accelerate_config=accelerate_config, slurm=slurm)


def _allocator_env(config: PlatformConfig) -> dict[str, str]:
    """The C allocator's settings for sharded CPU processes. FSDP gathers and frees each
    unit's parameters at every step; glibc's default raises its mmap threshold as such buffers
    are freed and keeps them in its heap, where a rank's memory grows past DDP's (a 51M-parameter
    model with Adam: 1718 MiB a rank sharded by hand, DDP 1460). A fixed threshold gives every
    buffer from 128 KiB up back when freed, but each step then faults its pages in again (0.32
    to 0.44x the samples/s); huge pages make those faults 512 times fewer. With both, ddpw ran
    at 0.88x the loop by hand and 0.50x its memory (scripts/bench row "sharding")."""
    if config.strategy != "fsdp" or config.uses_gpus:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def _hang_timeout(config: PlatformConfig) -> str:
    """``hang_timeout_s`` for a script's processes, which have no PlatformConfig of their own."""
    return "off" if config.hang_timeout_s is None else f"{config.hang_timeout_s:g}"


#: The ports that :func:`rendezvous_port` chooses from: below Linux's range of ephemeral ports
#: (32768 to 60999), which any outgoing connection may hold.
RENDEZVOUS_PORTS = (20000, 32767)


def rendezvous_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: derived from its id, so every node and task agrees
    on it without talking, and jobs sharing a node rarely collide (:data:`RENDEZVOUS_PORTS`)."""
    return random.Random(job_id).randint(*RENDEZVOUS_PORTS)


def auto_platform(facts: MachineFacts) -> dict[str, Any]:
    """The :class:`~ddpw.platform.PlatformConfig` fields that ``--platform auto`` stands for:
    every CUDA GPU if there are any, else the MPS device, else one CPU process per core."""
    if facts.cuda_devices:
        return {"platform": Platform.GPU, "n_gpus": facts.cuda_devices}
    if facts.mps_available:
        return {"platform": Platform.MPS}
    return {"platform": Platform.CPU, "n_procs": facts.cpu_count}


def _dynamo_args(config: PlatformConfig) -> tuple[str, ...]:
    """``accelerate launch``'s compile flags: what a script's own ``Accelerator()`` takes."""
    if not config.torch_compile:
        return ("--dynamo_backend", "no")
    return ("--dynamo_backend", "inductor", "--dynamo_mode", config.torch_compile_mode)


def _dynamo_env(config: PlatformConfig) -> dict[str, str]:
    """The same for a script started without ``accelerate launch`` (a world of one)."""
    if not config.torch_compile:
        return {}
    return {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
            "ACCELERATE_DYNAMO_MODE": config.torch_compile_mode}


def shortfall(config: PlatformConfig, facts: MachineFacts,
              in_place: bool = False) -> tuple[str, str] | None:
    """What this machine lacks to run ``config`` (``None`` when nothing): a line that says so,
    which a dry run (a job prepared here for another machine) shows beside the plan, and the
    error that refuses the job here. Inside a launch, a rank may see fewer GPUs than the config
    asks for (``srun --gpus-per-task=1`` shows each rank its own), but not none."""
    if config.platform is Platform.GPU:
        if facts.cuda_devices == 0:
            hint = (" Apple silicon's GPU is Platform.MPS." if facts.mps_available else "")
            return (f"this machine has no CUDA GPU that PyTorch can use: the plan is for one "
                    f"with {config.n_gpus}",
                    f"PlatformConfig.platform=Platform.GPU needs CUDA GPUs, and this machine has "
                    f"none that PyTorch can use (torch.cuda.device_count() is 0). Use "
                    f"PlatformConfig(platform=Platform.CPU, n_procs=N) to run N CPU "
                    f"processes.{hint}")
        if config.n_gpus > facts.cuda_devices and not in_place:
            visible = f"CUDA_VISIBLE_DEVICES={facts.env.get('CUDA_VISIBLE_DEVICES', 'unset')}"
            return (f"this machine shows {facts.cuda_devices} CUDA device(s) ({visible}): the "
                    f"plan is for one with {config.n_gpus}",
                    f"PlatformConfig.n_gpus={config.n_gpus} is more than the "
                    f"{facts.cuda_devices} CUDA device(s) visible here ({visible}); ask for at "
                    f"most {facts.cuda_devices}.")
    if config.torch_compile and config.platform is Platform.CPU and facts.cxx_compiler is None:
        return ("this machine has no C++ compiler on PATH (CXX, g++, c++, clang++), which "
                "PlatformConfig.torch_compile=True on Platform.CPU needs",
                "PlatformConfig.torch_compile=True on Platform.CPU needs a C++ compiler, which "
                "TorchInductor compiles the model's CPU code with, and none is on PATH here "
                "(CXX, g++, c++, clang++): install one (apt install g++), or compile nothing "
                "(torch_compile=False).")
    if config.platform is Platform.MPS and not facts.mps_available:
        return ("this machine has no Apple silicon GPU that PyTorch can use: the plan is for "
                "one that has",
                "PlatformConfig.platform=Platform.MPS needs an Apple silicon GPU with a PyTorch "
                "build that supports it (torch.backends.mps.is_available() is False here). Use "
                "Platform.CPU" + (" or Platform.GPU." if facts.cuda_devices else "."))
    return None


def _launch_around(env: Mapping[str, str], parent_pid: int,
                   pid: int) -> tuple[int, bool] | None:
    """The world size of the launch that this process is one rank of, and whether its
    process-group variables must be derived from a multi-task ``srun`` step's; ``None`` when
    the process is not inside a launch."""
    if all(name in env for name in TORCHRUN_VARIABLES):
        return int(env["WORLD_SIZE"]), False
    if _in_multi_task_srun(env):
        return int(env["SLURM_NTASKS"]), True
    if env.get(environment.NODE_RUNNER) == str(parent_pid):
        # The one process of a one-process ddpw SLURM job: a world of one needs no process
        # group, as in a world of one on one machine. (The variable names the node runner's
        # pid: the processes that this process starts in turn, and jobs it submits, inherit
        # it, and they are no ranks of this job.)
        return 1, False
    if env.get(environment.ONE_PROCESS_LAUNCH) == str(pid):
        return 1, False  # ddpw-launch --n-procs 1: a world of one, in this very process
    return None


def _in_multi_task_srun(env: Mapping[str, str]) -> bool:
    in_step = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env
    return in_step and int(env.get("SLURM_NTASKS", "1")) > 1
