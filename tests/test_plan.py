"""ddpw.plan.resolve_plan as pure data, on fake machines."""

import dataclasses
import os
import re
import sys
import warnings

import pytest
import torch

from ddpw import environment
from ddpw import plan as plan_module
from ddpw.errors import ConfigError
from ddpw.plan import LaunchMode, LaunchPlan, MachineFacts, gpu_driver_present, resolve_plan
from ddpw.platform import Platform, PlatformConfig

TORCHRUN_ENV = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}
SRUN_ENV = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}


#: The process id of the node runner that started the process in :func:`node_runner_env`.
NODE_RUNNER_PID = 4242


def machine(cuda=0, mps=False, cpus=8, env=None, parent_pid=NODE_RUNNER_PID):
    return MachineFacts(cuda_devices=cuda, mps_available=mps, cpu_count=cpus, env=env or {},
                        parent_pid=parent_pid)


def cpu(n_procs=None, **kwargs):
    return PlatformConfig(platform=Platform.CPU, n_procs=n_procs, **kwargs)


def gpu(n_gpus=1, **kwargs):
    return PlatformConfig(platform=Platform.GPU, n_gpus=n_gpus, **kwargs)


def option(plan, flag):
    """The value that follows ``flag`` in the plan's launch arguments."""
    args = list(plan.launch_args)
    assert args.count(flag) == 1, args
    return args[args.index(flag) + 1]


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_procs", [None, 1])
def test_cpu_one_process_runs_in_process(n_procs):
    plan = resolve_plan(cpu(n_procs), machine())
    assert plan.mode is LaunchMode.IN_PROCESS
    assert plan.platform is Platform.CPU
    assert plan.world_size == 1
    assert plan.accelerator_kwargs["cpu"] is True
    assert plan.accelerator_kwargs["mixed_precision"] == "no"
    assert plan.launch_args == ()
    assert plan.srun_env is False


def test_cpu_one_process_keeps_cpus_per_task():
    plan = resolve_plan(cpu(cpus_per_task=3), machine())
    assert plan.threads_per_process == 3
    assert resolve_plan(cpu(), machine()).threads_per_process is None


def test_cpu_several_processes_use_accelerate():
    plan = resolve_plan(cpu(2), machine(cpus=8))
    assert plan.mode is LaunchMode.ACCELERATE
    assert plan.world_size == 2
    assert "--multi_gpu" in plan.launch_args
    assert option(plan, "--num_processes") == "2"
    assert option(plan, "--num_machines") == "1"
    assert "--main_process_ip" not in plan.launch_args  # one machine: no address to give
    assert option(plan, "--main_process_port") == "0"
    assert plan.standalone is True
    assert plan.env["ACCELERATE_USE_CPU"] == "1"
    assert plan.accelerator_kwargs["cpu"] is True
    assert plan.accelerate_config["use_cpu"] is True
    assert plan.accelerate_config["distributed_type"] == "MULTI_GPU"
    assert plan.srun_env is False


def test_launch_args_are_strings():
    plan = resolve_plan(cpu(3, master_port=1234), machine())
    assert all(isinstance(arg, str) for arg in plan.launch_args)


@pytest.mark.parametrize("port", [1, 29555, 65535])
def test_master_port_is_passed_on(port):
    assert option(resolve_plan(cpu(2, master_port=port), machine()), "--main_process_port") == \
        str(port)


def test_a_fixed_port_is_used_as_given_not_standalone():
    assert resolve_plan(cpu(2, master_port=29555), machine()).standalone is False


@pytest.mark.parametrize("cpus, procs, threads", [
    (8, 2, 4), (7, 2, 3), (16, 3, 5), (2, 4, 1), (1, 3, 1), (4, 4, 1),
])
def test_cpu_threads_split_the_cores(cpus, procs, threads):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        plan = resolve_plan(cpu(procs), machine(cpus=cpus))
    assert len(said) == (procs > cpus)  # more processes than cores are said to share them
    assert plan.env["OMP_NUM_THREADS"] == str(threads)
    assert plan.threads_per_process == threads


@pytest.mark.parametrize("cpus_per_task", [1, 3, 12])
def test_cpus_per_task_overrides_threads(cpus_per_task):
    plan = resolve_plan(cpu(2, cpus_per_task=cpus_per_task), machine(cpus=8))
    assert plan.env["OMP_NUM_THREADS"] == str(cpus_per_task)
    assert plan.threads_per_process == cpus_per_task


def test_resolve_plan_leaves_facts_alone():
    env = {"PATH": "/bin"}
    plan = resolve_plan(cpu(2), machine(env=env))
    assert env == {"PATH": "/bin"}
    assert "PATH" not in plan.env


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_gpus", [1, 4])
def test_gpu_without_cuda(n_gpus):
    with pytest.raises(ConfigError, match=r"PlatformConfig\.platform=Platform\.GPU") as info:
        resolve_plan(gpu(n_gpus), machine(cuda=0, mps=False))
    message = str(info.value)
    assert re.search(r"CUDA", message)
    assert re.search(r"none|no CUDA|not available|is False", message)
    assert "Platform.CPU" in message
    assert "MPS" not in message


def test_gpu_without_cuda_points_to_mps_where_available():
    with pytest.raises(ConfigError, match=r"Platform\.CPU") as info:
        resolve_plan(gpu(), machine(cuda=0, mps=True))
    assert "Platform.MPS" in str(info.value)


def test_gpu_more_than_visible():
    with pytest.raises(ConfigError, match=r"PlatformConfig\.n_gpus=4\b") as info:
        resolve_plan(gpu(4), machine(cuda=2, env={"CUDA_VISIBLE_DEVICES": "3,5"}))
    message = str(info.value)
    assert re.search(r"\b2\b", message)
    assert "3,5" in message


@pytest.mark.parametrize("cuda", [4, 8])
def test_gpu_several_use_accelerate(cuda):
    plan = resolve_plan(gpu(4), machine(cuda=cuda, cpus=64))
    assert plan.mode is LaunchMode.ACCELERATE
    assert plan.platform is Platform.GPU
    assert plan.world_size == 4
    assert "--multi_gpu" in plan.launch_args
    assert option(plan, "--num_processes") == "4"
    assert "ACCELERATE_USE_CPU" not in plan.env
    # The machine's cores split among the GPU processes, not torchrun's one thread each.
    assert plan.env["OMP_NUM_THREADS"] == "16"
    assert plan.threads_per_process == 16
    assert plan.accelerator_kwargs["cpu"] is False
    assert plan.accelerate_config["use_cpu"] is False
    assert plan.accelerate_config["distributed_type"] == "MULTI_GPU"


def test_gpu_processes_keep_the_users_omp_num_threads():
    plan = resolve_plan(gpu(4), machine(cuda=4, cpus=64, env={"OMP_NUM_THREADS": "3"}))
    assert "OMP_NUM_THREADS" not in plan.env and plan.threads_per_process is None


def test_gpu_cpus_per_task_sets_threads():
    plan = resolve_plan(gpu(2, cpus_per_task=6), machine(cuda=2))
    assert plan.env["OMP_NUM_THREADS"] == "6"
    assert plan.threads_per_process == 6


def test_gpu_one_runs_in_process():
    plan = resolve_plan(gpu(1), machine(cuda=2))
    assert plan.mode is LaunchMode.IN_PROCESS
    assert plan.world_size == 1
    assert plan.accelerator_kwargs["cpu"] is False
    assert plan.launch_args == ()


@pytest.mark.parametrize("config", [
    gpu(2, mixed_precision="no"), gpu(2, mixed_precision="fp16"), gpu(2, mixed_precision="bf16"),
    cpu(2, mixed_precision="bf16"),
])
def test_mixed_precision_reaches_launch_and_accelerator(config):
    plan = resolve_plan(config, machine(cuda=2))
    # Not as a flag: accelerate would initialise CUDA in the caller to check it.
    assert "--mixed_precision" not in plan.launch_args
    assert plan.accelerator_kwargs["mixed_precision"] == config.mixed_precision
    assert plan.accelerate_config["mixed_precision"] == config.mixed_precision


@pytest.mark.parametrize("config", [gpu(1, mixed_precision="fp16"), cpu(mixed_precision="bf16")])
def test_mixed_precision_in_process(config):
    plan = resolve_plan(config, machine(cuda=1))
    assert plan.mode is LaunchMode.IN_PROCESS
    assert plan.accelerator_kwargs["mixed_precision"] == config.mixed_precision


# ------------------------------------------------------------------------------------------------
# MPS and SLURM
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cuda, suggested", [(0, ["Platform.CPU"]),
                                             (2, ["Platform.CPU", "Platform.GPU"])])
def test_mps_unavailable(cuda, suggested):
    config = PlatformConfig(platform=Platform.MPS)
    with pytest.raises(ConfigError, match=r"PlatformConfig\.platform=Platform\.MPS") as info:
        resolve_plan(config, machine(cuda=cuda, mps=False))
    for name in suggested:
        assert name in str(info.value)


def test_mps_available_runs_in_process():
    plan = resolve_plan(PlatformConfig(platform=Platform.MPS), machine(mps=True))
    assert plan.mode is LaunchMode.IN_PROCESS
    assert plan.platform is Platform.MPS
    assert plan.world_size == 1
    assert plan.accelerator_kwargs["cpu"] is False


SIGNAL_90 = {"slurm_signal_delay_s": 90, "slurm_additional_parameters": {"signal": "USR2@90"},
             "slurm_setup": ["export SUBMITIT_PREEMPT_SIGNAL=USR2"],
             "slurm_srun_args": ["--kill-on-bad-exit=1"]}


@pytest.mark.parametrize(("kwargs", "expected", "world"), [
    # A GPU partition: one task per node holding the cores of its GPU processes, the GPUs, the
    # memory.
    ({"n_nodes": 2, "n_gpus": 4, "cpus_per_task": 8, "mem_gb": 256, "partition": "gpu",
      "timeout_min": 60, "name": "big"},
     {"name": "big", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 32, "gpus_per_node": 4,
      "mem_gb": 256, "timeout_min": 60, "slurm_partition": "gpu", **SIGNAL_90}, 8),
    # A CPU-only partition: n_procs processes per node, one core each by default.
    ({"n_nodes": 3, "n_gpus": 0, "n_procs": 2},
     {"name": "DDPW", "nodes": 3, "tasks_per_node": 1, "cpus_per_task": 2, "timeout_min": 2880,
      "slurm_partition": "general", **SIGNAL_90}, 6),
    # n_procs and nothing about GPUs: CPU processes, as with n_gpus=0.
    ({"n_nodes": 2, "n_procs": 1, "partition": "debug"},
     {"name": "DDPW", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 2880,
      "slurm_partition": "debug", **SIGNAL_90}, 2),
    # Account, QoS, constraint, exclusive, another signal, and any other sbatch option.
    ({"n_nodes": 1, "n_gpus": 8, "account": "proj42", "qos": "high", "constraint": "a100",
      "exclusive": True, "requeue_signal": "SIGUSR1", "signal_delay_s": 300,
      "slurm_parameters": {"mail_type": "END", "mail-user": "me@example.org", "hint": True}},
     {"name": "DDPW", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 64, "gpus_per_node": 8,
      "timeout_min": 2880, "slurm_partition": "general", "slurm_account": "proj42",
      "slurm_qos": "high", "slurm_constraint": "a100", "slurm_exclusive": True,
      "slurm_signal_delay_s": 300, "slurm_setup": ["export SUBMITIT_PREEMPT_SIGNAL=USR1"],
      "slurm_srun_args": ["--kill-on-bad-exit=1"],
      "slurm_additional_parameters": {"signal": "USR1@300", "mail_type": "END",
                                      "mail-user": "me@example.org", "hint": True}}, 8),
])
def test_slurm_parameters_as_data(kwargs, expected, world):
    # The submitting machine needs no GPU: the nodes have them.
    plan = resolve_plan(PlatformConfig(platform=Platform.SLURM, **kwargs), machine(cuda=0))
    assert plan.mode is LaunchMode.SLURM and plan.world_size == world
    assert plan.slurm == expected
    assert option(plan, "--num_processes") == str(world)
    assert option(plan, "--num_machines") == str(kwargs["n_nodes"])
    uses_cpu = "gpus_per_node" not in expected
    assert plan.accelerator_kwargs["cpu"] is uses_cpu
    assert ("ACCELERATE_USE_CPU" in plan.env) is uses_cpu


@pytest.mark.parametrize(("fields", "uses_cpu"), [
    ({"n_gpus": 1, "mixed_precision": "bf16"}, False),
    ({"n_gpus": 1, "mixed_precision": "fp16"}, False),
    ({"n_procs": 1, "mixed_precision": "bf16"}, True),
    ({"n_gpus": 2, "mixed_precision": "bf16"}, False),
    ({"n_nodes": 2, "n_procs": 1}, True),
])
def test_slurm_processes_get_the_platforms_accelerate_settings(fields, uses_cpu):
    """A one-process SLURM job starts its process without accelerate launch: the plan's
    environment alone gives a plain Accelerator() the mixed precision and the CPU."""
    config = PlatformConfig(platform=Platform.SLURM, **fields)
    plan = resolve_plan(config, machine())
    assert plan.env["ACCELERATE_MIXED_PRECISION"] == config.mixed_precision
    assert plan.accelerate_config["mixed_precision"] == config.mixed_precision
    assert (plan.env.get("ACCELERATE_USE_CPU") == "1") is uses_cpu


@pytest.mark.parametrize(("fields", "cores", "threads"), [
    # GPU processes: 8 cores each unless told otherwise (fewer where the nodes have fewer).
    ({"n_gpus": 1}, 8, 8),
    ({"n_gpus": 4, "n_nodes": 2}, 32, 8),
    ({"n_gpus": 4, "cpus_per_task": 2}, 8, 2),
    ({"n_gpus": 4, "cpus_per_task": 16}, 64, 16),
    # CPU processes: one core each unless told otherwise.
    ({"n_procs": 4}, 4, 1),
    ({"n_procs": 4, "cpus_per_task": 3}, 12, 3),
])
def test_slurm_cores_per_process(fields, cores, threads):
    plan = resolve_plan(PlatformConfig(platform=Platform.SLURM, **fields), machine())
    assert plan.slurm["cpus_per_task"] == cores
    assert plan.env["OMP_NUM_THREADS"] == str(threads)
    assert plan.threads_per_process == threads


@pytest.mark.parametrize(("kinds", "threads"), [
    ([(4, 128, "gpu:8")], 8),             # 16 cores per GPU: the default of 8 fits
    ([(4, 48, "gpu:8(S:0-1)")], 6),        # 6 cores per GPU on these nodes
    ([(1, 4, "gpu:4")], 1),               # one core per GPU, as on the test cluster's g1
    ([(2, 8, "gpu:2"), (2, 64, "gpu:4")], 8),  # the nodes of too few GPUs do not count
    ([(2, 12, "(null)")], 3),             # no node has the GPUs (sbatch refuses): a node's cores
    ([(2, 64, "gpu:4"), (2, 20, "gpu:4"), (3, 96, "(null)")], 5),  # the smallest GPU node's
])
def test_slurm_default_gpu_cores_fit_the_partitions_nodes(kinds, threads):
    from ddpw.slurm import fit_cores

    plan = resolve_plan(PlatformConfig(platform=Platform.SLURM, n_gpus=4), machine())
    fitted = fit_cores(plan, kinds)
    assert fitted.slurm["cpus_per_task"] == 4 * threads
    assert fitted.env["OMP_NUM_THREADS"] == str(threads)
    assert fitted.threads_per_process == threads
    assert fitted.slurm["gpus_per_node"] == 4 and fitted.launch_args == plan.launch_args


# ------------------------------------------------------------------------------------------------
# Already inside a distributed launch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, facts", [
    (cpu(), machine(env=TORCHRUN_ENV)),
    (cpu(4), machine(env=TORCHRUN_ENV)),
    (gpu(4), machine(cuda=4, env=TORCHRUN_ENV)),
    (gpu(1), machine(cuda=1, env=TORCHRUN_ENV)),
])
def test_torchrun_variables_run_in_place(config, facts):
    plan = resolve_plan(config, facts)
    assert plan.mode is LaunchMode.IN_PLACE
    assert plan.world_size == 4
    assert plan.srun_env is False
    assert plan.launch_args == ()
    assert plan.accelerator_kwargs["cpu"] is (config.platform is Platform.CPU)


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "RANK", "LOCAL_RANK"])
def test_some_torchrun_variables_are_not_enough(missing):
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != missing}
    assert resolve_plan(cpu(), machine(env=env)).mode is LaunchMode.IN_PROCESS
    assert resolve_plan(cpu(2), machine(env=env)).mode is LaunchMode.ACCELERATE


@pytest.mark.parametrize("config", [cpu(), cpu(4)])
def test_multi_task_srun_runs_in_place(config):
    plan = resolve_plan(config, machine(env=SRUN_ENV))
    assert plan.mode is LaunchMode.IN_PLACE
    assert plan.srun_env is True
    assert plan.world_size == 4


def test_torchrun_variables_win_over_srun():
    plan = resolve_plan(cpu(), machine(env={**SRUN_ENV, **TORCHRUN_ENV, "WORLD_SIZE": "8"}))
    assert plan.mode is LaunchMode.IN_PLACE
    assert plan.srun_env is False
    assert plan.world_size == 8


@pytest.mark.parametrize("env", [SRUN_ENV, TORCHRUN_ENV])
@pytest.mark.parametrize("n_gpus", [4, 8])
def test_a_rank_that_sees_only_its_own_gpu_runs_in_place(env, n_gpus):
    """srun --ntasks-per-node=4 --gpus-per-task=1, or any launcher that gives each rank its own
    CUDA_VISIBLE_DEVICES: every rank sees one GPU, and the launch's world runs in place (the
    Wrapper warns when it is not the world that the config asks for)."""
    plan = resolve_plan(gpu(n_gpus), machine(cuda=1, env={**env, "CUDA_VISIBLE_DEVICES": "2"}))
    assert plan.mode is LaunchMode.IN_PLACE
    assert plan.world_size == 4
    assert plan.accelerator_kwargs["cpu"] is False


@pytest.mark.parametrize("env", [SRUN_ENV, TORCHRUN_ENV])
def test_in_place_platform_gpu_without_any_cuda_gpu_is_refused(env):
    # Not a silent run on the CPU.
    with pytest.raises(ConfigError, match=r"^PlatformConfig\.platform=Platform\.GPU needs CUDA "
                                          r"GPUs, and this machine has none"):
        resolve_plan(gpu(4), machine(cuda=0, env=env))


@pytest.mark.parametrize("env", [SRUN_ENV, TORCHRUN_ENV])
def test_in_place_platform_mps_without_mps_is_refused(env):
    with pytest.raises(ConfigError, match=r"PlatformConfig\.platform=Platform\.MPS needs"):
        resolve_plan(PlatformConfig(platform=Platform.MPS), machine(env=env))


def test_wrapper_in_place_with_one_gpu_per_rank_warns_and_runs(monkeypatch):
    """The user's side of the case above: a warning, and the job runs, not a ConfigError. (The
    facts are faked; the job itself runs here, in a world of one.)"""
    from accelerate.state import AcceleratorState, GradientState

    from ddpw import Wrapper

    facts = machine(cuda=1, env={**TORCHRUN_ENV, "CUDA_VISIBLE_DEVICES": "2"})
    monkeypatch.setattr(MachineFacts, "probe", classmethod(lambda cls: facts))
    try:
        with pytest.warns(UserWarning, match=r"world of 4 processes; PlatformConfig asks for 8"):
            assert Wrapper(gpu(8, verbose=False)).start(lambda: "ran") == ["ran"]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def node_runner_env(plan, **slurm):
    """What a process that ddpw's node runner starts sees in a one-process SLURM job: the
    plan's environment and SLURM's variables of a one-task step, no torchrun variables."""
    return {**plan.env, "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
            "SLURM_NTASKS": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "0",
            "DDPW_NODE_RUNNER": str(NODE_RUNNER_PID), **slurm}


@pytest.mark.parametrize("fields", [{"n_procs": 1}, {"n_gpus": 1}])
def test_a_script_that_ddpw_started_on_slurm_runs_in_place_in_a_world_of_one(fields):
    """ddpw-launch --platform slurm --n-gpus 1 train.py, whose train.py starts a Wrapper with
    the same SLURM config: it runs in place, and submits no second job."""
    config = PlatformConfig(platform=Platform.SLURM, **fields)
    outer = resolve_plan(config, machine())
    assert outer.mode is LaunchMode.SLURM and outer.world_size == 1
    inner = resolve_plan(config, machine(cuda=1, env=node_runner_env(outer)))
    assert inner.mode is LaunchMode.IN_PLACE
    assert inner.world_size == 1
    assert inner.srun_env is False  # no process group to make up for a world of one
    assert inner.slurm == {}
    assert inner.accelerator_kwargs["cpu"] is (config.n_gpus == 0)


def test_what_the_node_runners_process_starts_in_turn_is_no_rank_of_its_job():
    """A process that the job's script starts (or a job it submits) inherits the variable, but
    not as the node runner's child: a Wrapper there launches as it would anywhere."""
    config = PlatformConfig(platform=Platform.SLURM, n_procs=1)
    env = node_runner_env(resolve_plan(config, machine()))
    assert resolve_plan(config, machine(env=env, parent_pid=1234)).mode is LaunchMode.SLURM
    assert resolve_plan(cpu(2), machine(env=env, parent_pid=1234)).mode is LaunchMode.ACCELERATE


def test_a_slurm_step_that_ddpw_did_not_start_still_submits():
    config = PlatformConfig(platform=Platform.SLURM, n_procs=1)
    plain = {k: v for k, v in node_runner_env(resolve_plan(config, machine())).items()
             if not k.startswith("DDPW_")}
    assert resolve_plan(config, machine(env=plain)).mode is LaunchMode.SLURM


@pytest.mark.parametrize("env", [
    {**SRUN_ENV, "SLURM_NTASKS": "1"},
    {k: v for k, v in SRUN_ENV.items() if k != "SLURM_NTASKS"},
    {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_ID"},
    {k: v for k, v in SRUN_ENV.items() if k != "SLURM_PROCID"},
])
def test_single_task_slurm_is_not_in_place(env):
    assert resolve_plan(cpu(), machine(env=env)).mode is LaunchMode.IN_PROCESS
    plan = resolve_plan(cpu(2), machine(env=env))
    assert plan.mode is LaunchMode.ACCELERATE
    assert plan.srun_env is False


# ------------------------------------------------------------------------------------------------
# LaunchPlan.command and MachineFacts.probe
# ------------------------------------------------------------------------------------------------

def test_command():
    plan = resolve_plan(cpu(2), machine())
    entry = ["-m", "ddpw.entry", "/tmp/job.pkl"]
    command = plan.command("/tmp/accelerate.yaml", entry)
    assert command[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "/tmp/accelerate.yaml"]
    assert command[-3:] == entry
    assert command[5:-3] == list(plan.launch_args)


def test_command_of_a_hand_made_plan():
    plan = LaunchPlan(mode=LaunchMode.ACCELERATE, platform=Platform.CPU, world_size=2,
                      threads_per_process=None, accelerator_kwargs={},
                      launch_args=("--a", "1"))
    assert plan.command("c.yaml", ["e.py"]) == [sys.executable, "-m",
                                                 "accelerate.commands.launch", "--config_file",
                                                 "c.yaml", "--a", "1", "e.py"]


def test_probe_this_machine():
    facts = MachineFacts.probe()
    # 0 on a machine without CUDA (like the CPU-only CI machine); the visible count elsewhere.
    # Torch's answers, whether the probe asked torch or found no GPU driver to ask it about.
    assert facts.cuda_devices == torch.cuda.device_count()
    assert facts.mps_available == torch.backends.mps.is_available()
    assert isinstance(facts.cpu_count, int)
    assert 1 <= facts.cpu_count <= (os.cpu_count() or 1)
    assert isinstance(facts.mps_available, bool)
    assert dict(facts.env) == dict(os.environ)


def sbatch_script(config, kind, folder):
    """The sbatch script that submitit writes for ``config``: the parameters that
    slurm.submit gives submitit's executor, from the plan that resolve_plan made."""
    import submitit

    from ddpw.slurm import RequeuePolicy, executor_parameters

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    plan = resolve_plan(config, machine(cuda=0))
    executor.update_parameters(**executor_parameters(plan, RequeuePolicy(kind)))
    # What the executor hands sbatch: submitit.slurm.slurm._make_sbatch_string(**parameters).
    return executor._executor._make_submission_file_text("run", "uid").splitlines()


def test_the_sbatch_script_that_submitit_writes_from_the_plan(tmp_path):
    config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_gpus=4, cpus_per_task=6,
                            mem_gb=128, account="proj42", qos="high", constraint="a100",
                            exclusive=True, timeout_min=90, partition="gpu", name="big",
                            slurm_parameters={"mail_type": "END"})
    script = sbatch_script(config, "pauses", tmp_path)
    for line in ("#SBATCH --job-name=big", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=24", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --mem=128GB", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj42", "#SBATCH --qos=high", "#SBATCH --constraint=a100",
                 "#SBATCH --exclusive", "#SBATCH --signal=USR2@90", "#SBATCH --mail-type=END",
                 "#SBATCH --requeue", "export SUBMITIT_PREEMPT_SIGNAL=USR2"):
        assert line in script, line
    assert "#SBATCH --no-requeue" not in script


def test_the_sbatch_script_of_cpu_processes_asks_for_no_gpu(tmp_path):
    """The command line of ddpw-launch --platform slurm --n-nodes 2 --n-procs 1, without
    --n-gpus: no GPU asked of sbatch, which a CPU partition would refuse."""
    config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_procs=1, partition="debug",
                            requeue_signal="SIGUSR1", signal_delay_s=120)
    script = sbatch_script(config, "runs on", tmp_path)
    assert not [line for line in script if "gpu" in line.lower() or "gres" in line.lower()]
    for line in ("#SBATCH --nodes=2", "#SBATCH --cpus-per-task=1", "#SBATCH --partition=debug",
                 "#SBATCH --signal=USR1@120", "#SBATCH --no-requeue",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR1"):
        assert line in script, line


def test_probe_counts_cuda_devices_without_initialising_cuda(monkeypatch):
    """On a CUDA build whose NVML answers, the probe never reaches the CUDA runtime (cuInit),
    so that the caller may still fork processes that use CUDA."""

    def initialises_cuda(*args, **kwargs):
        raise AssertionError("the probe initialised CUDA")

    for name in ("is_available", "init", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, initialises_cuda)
    # A CUDA build's runtime count (cudaGetDeviceCount, which runs cuInit).
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", initialises_cuda, raising=False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 3)
    monkeypatch.setattr(plan_module, "gpu_driver_present", lambda: True)
    assert MachineFacts.probe().cuda_devices == 3


def test_probe_without_a_gpu_driver_does_not_import_torch(monkeypatch):
    """What ddpw-launch --dry-run probes on a machine without a GPU driver: no torch needed."""
    monkeypatch.setattr(plan_module, "gpu_driver_present", lambda: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    facts = MachineFacts.probe()
    assert (facts.cuda_devices, facts.mps_available) == (0, False)
    assert 1 <= facts.cpu_count <= (os.cpu_count() or 1)
    assert dict(facts.env) == dict(os.environ)


def test_probe_with_a_gpu_driver_asks_torch(monkeypatch):
    monkeypatch.setattr(plan_module, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    facts = MachineFacts.probe()
    assert (facts.cuda_devices, facts.mps_available) == (2, True)


@pytest.mark.parametrize("system, paths, present", [
    ("linux", set(), False),
    ("linux", {"/proc/driver/nvidia"}, True),
    ("linux", {"/dev/kfd"}, True),  # ROCm, whose GPUs torch.cuda counts
    ("linux", {"/dev/dxg"}, True),  # WSL, where NVIDIA's driver is not in /proc
    ("darwin", set(), True),  # MPS
    ("win32", set(), True),
])
def test_gpu_driver_present(monkeypatch, system, paths, present):
    monkeypatch.setattr(plan_module.sys, "platform", system)
    with monkeypatch.context() as patch:  # os.path.exists faked for this call alone
        patch.setattr(plan_module.os.path, "exists", lambda path: path in paths)
        assert gpu_driver_present() is present


def test_gpu_driver_present_agrees_with_torch_here():
    """A machine without a GPU driver has no device that torch can see: the probe's shortcut
    changes no fact on this machine."""
    if not gpu_driver_present():
        assert torch.cuda.device_count() == 0
        assert not torch.backends.mps.is_available()


def test_more_processes_than_cores_are_said_to_share_them_once():
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("default")  # Python's own: once for each place it comes from
        for _ in range(2):
            plan = resolve_plan(cpu(4), machine(cpus=2))
    assert [str(warning.message) for warning in said] == [
        "4 processes share this machine's 2 core(s), 1 compute thread(s) each: they take turns, "
        "each slower than it would run alone."]
    assert plan.threads_per_process == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as many processes as cores: no word
        resolve_plan(cpu(2), machine(cpus=2))


def test_ddpw_launchs_own_process_is_a_world_of_one_to_a_wrapper_in_it():
    """ddpw-launch --n-procs 1 runs the script in its own process, and names that process: a
    Wrapper there runs in place whatever its config asks for; a process that the script
    starts (another pid) is no part of it."""
    env = {environment.ONE_PROCESS_LAUNCH: "77"}
    facts = MachineFacts(cuda_devices=0, mps_available=False, cpu_count=8, env=env, pid=77)
    inside = resolve_plan(cpu(3), facts)
    assert (inside.mode, inside.world_size) == (LaunchMode.IN_PLACE, 1)
    child = resolve_plan(cpu(3), dataclasses.replace(facts, pid=78))
    assert (child.mode, child.world_size) == (LaunchMode.ACCELERATE, 3)
