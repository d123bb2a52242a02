"""ddpw-launch: real scripts on 2 CPU processes, dry-run plans for every platform, bad flags."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from jobs import wait_for_mid_epoch

from ddpw import checkpoint as ckpt
from ddpw.cli import FIELDS, _in_cli_words, main
from ddpw.errors import PAUSED_EXIT_STATUS
from ddpw.jobfolder import DEFAULT_ROOT
from ddpw.plan import MachineFacts

SCRIPTS = Path(__file__).resolve().parent / "scripts"
TRAIN = str(SCRIPTS / "accelerate_train.py")
#: The installed command, whose import path (unlike `python -m ddpw`'s) lacks the current folder.
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("ddpw-launch"))
#: What the agent of torchrun logs when a rank fails, which belongs in the job's agent.log.
AGENT_LINES = ("Sending process", "closing signal", "failed (exitcode")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run each test in a folder of its own that holds the train.py the plans name (a script
    that does not exist is refused)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")


def ddpw_launch(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run([sys.executable, "-m", "ddpw", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **(env or {})})


def test_a_plain_accelerate_script_gets_one_synchronised_world_of_two(tmp_path):
    out = ddpw_launch("--platform", "cpu", "--n-procs", "2", TRAIN, "--epochs", "1",
                      cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result["params_equal"], "gradients were not synchronised"
    first, second = (set(seen) for seen in result["seen"])
    assert len(first) == len(second) == 48 and first | second == set(range(96))
    (folder,) = (tmp_path / "logs" / "console_logs").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank-0.stderr.log", "rank-0.stdout.log", "rank-1.stderr.log", "rank-1.stdout.log",
        "times.json"]
    # The script's start-up (from the launch to its start, as it makes no heartbeat) and run.
    times = json.loads((folder / "times.json").read_text())
    assert times["launch"] < times["started"] < times["ended"] and times["heartbeat"] is None
    assert re.search(r"^\[ddpw\] goodput [\d.]+%: run [\d.]+ s of [\d.]+ s \(start-up [\d.]+ s, "
                     r"from the launch to its start\)$", out.stderr, re.MULTILINE), out.stderr


def test_a_leftover_accelerate_config_changes_nothing(tmp_path):
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(textwrap.dedent("""
        compute_environment: LOCAL_MACHINE
        distributed_type: 'NO'
        mixed_precision: bf16
        num_processes: 1
        use_cpu: false
        debug: true
        gpu_ids: '0'
    """))
    out = ddpw_launch("--platform", "cpu", "--n-procs", "2", TRAIN, "--epochs", "1",
                      cwd=tmp_path, env={"HF_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["world_size"], result["params_equal"]) == (2, True)
    assert result["mixed_precision"] == "no", "the leftover config's bf16 was used"


def test_a_failing_rank_gives_its_status_and_traceback(tmp_path):
    out = ddpw_launch("--platform", "cpu", "--n-procs", "2", TRAIN, "--fail-on-rank", "1",
                      cwd=tmp_path)
    assert out.returncode == 1
    assert "RuntimeError: rank 1 fails on purpose" in out.stderr
    assert "[ddpw] rank 1 failed (exit status 1)" in out.stderr
    assert not [line for line in AGENT_LINES if line in out.stderr], out.stderr


def test_on_failure_the_console_shows_each_rank_once_and_the_agents_lines_go_to_its_log(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 fails on purpose")
        ended = []
        signal.signal(signal.SIGTERM, lambda *_: ended.append(True))
        while not ended:  # until the agent ends this rank, as rank 1 has failed
            time.sleep(0.1)
        dist.barrier()  # rank 1 is gone: gloo says that the peer closed the connection
    """))
    out = ddpw_launch("--platform", "cpu", "--n-procs", "2", str(script), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    (folder,) = Path("logs", "console_logs").iterdir()
    # The whole console, but for the frames of rank 1's traceback: rank 0 (which the console
    # shows) only lost its peer, and says so in one line; rank 1's own end; one line that
    # names both.
    lost = r"lost a peer \(Connection (closed|reset) by peer \[127\.0\.0\.1\]\)"
    expected = [re.escape(f"[ddpw] 2 processes; every rank's output in {folder}"),
                rf"\[rank0\]: \[ddpw\] rank 0 {lost}: a consequence of another rank's failure",
                re.escape("[rank1]: Traceback (most recent call last):"),
                re.escape("[rank1]: RuntimeError: rank 1 fails on purpose"),
                rf"\[ddpw\] rank 1 failed \(exit status 1\); rank 0 {lost}; logs in "
                rf"{re.escape(str(folder))}"]
    said = [line for line in out.stderr.splitlines() if not line.startswith("[rank1]:   ")]
    assert len(said) == len(expected) and out.stdout == "", out.stderr
    for line, pattern in zip(said, expected, strict=True):
        assert re.fullmatch(pattern, line), out.stderr
    agent = (folder / "agent.log").read_text()
    assert re.search(r"Sending process \d+ closing signal SIGTERM", agent), agent
    assert "failed (exitcode: 1) local_rank: 1" in agent


@pytest.mark.parametrize(("args", "message", "status"), [
    (["--platform", "cpu", "--n-procs", "2", "nope.py"],
     "can't open file '{cwd}/nope.py': [Errno 2] No such file or directory", 2),
    (["--platform", "cpu", "--n-procs", "2", "--dry-run", "nope.py"],
     "can't open file '{cwd}/nope.py': [Errno 2] No such file or directory", 2),
    (["--platform", "slurm", "--n-gpus", "0", "nope.py"],
     "can't open file '{cwd}/nope.py': [Errno 2] No such file or directory", 2),
    (["--platform", "cpu", "--n-procs", "2", "-m", "nope_pkg.train"],
     "Error while finding module specification for 'nope_pkg.train' (ModuleNotFoundError: "
     "No module named 'nope_pkg')", 1),
    (["--platform", "cpu", "--n-procs", "2", "-m", "present.nope"],
     "No module named present.nope", 1),
])
def test_a_missing_script_or_module_is_refused_before_anything_starts(tmp_path, args, message,
                                                                      status):
    (tmp_path / "present").mkdir()
    (tmp_path / "present" / "__init__.py").write_text("")
    out = ddpw_launch(*args, cwd=tmp_path)
    # python's own words and status, on one line.
    assert (out.returncode, out.stderr) == (status,
                                            f"ddpw-launch: {message.format(cwd=tmp_path)}\n")
    assert out.stdout == ""
    assert not (tmp_path / "logs").exists(), "a worker started"


def test_a_script_using_wrapper_runs_in_place_under_ddpw_launch(tmp_path):
    script = tmp_path / "wrapped.py"
    script.write_text(textwrap.dedent("""
        import os
        from ddpw import Platform, PlatformConfig, Wrapper, world

        def who():
            return (world().global_rank, world().world_size, os.getpid())

        results = Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=2)).start(who)
        with open(f"result-{os.environ['RANK']}.txt", "w") as f:
            f.write(repr((os.getpid(), results)))
    """))
    out = ddpw_launch("--platform", "cpu", "--n-procs", "2", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        pid, results = ast.literal_eval((tmp_path / f"result-{rank}.txt").read_text())
        assert [r[:2] for r in results] == [(0, 2), (1, 2)]
        assert results[rank][2] == pid, "the job was launched a second time"


def test_one_process_runs_the_script_and_its_wrapper_in_the_commands_own_process(tmp_path):
    script = tmp_path / "one.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from ddpw import Platform, PlatformConfig, Wrapper, world

        print(os.getpid(), os.environ['ACCELERATE_USE_CPU'], sys.argv[1:])
        with open("launched.txt", "w") as f:  # when ddpw-launch launched it (ddpw.goodput)
            f.write(os.environ["DDPW_LAUNCH_TIME"])

        def who():
            return (world().global_rank, world().world_size, os.getpid())

        # The user asked ddpw-launch for one process: the Wrapper's 3 are not started.
        print(Wrapper(PlatformConfig(platform=Platform.CPU, n_procs=3)).start(who))
    """))
    command = subprocess.Popen([sys.executable, "-m", "ddpw", "--platform", "cpu", "--n-procs",
                                "1", str(script), "a", "--b"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = command.communicate(timeout=120)
    assert command.returncode == 0, err
    assert out.splitlines() == [f"{command.pid} 1 ['a', '--b']", f"[(0, 1, {command.pid})]"]
    assert ("ddpw runs in place, in the existing launch's world of 1 processes; PlatformConfig "
            "asks for 3.") in err
    assert not (tmp_path / "logs").exists(), "a launch started"
    # ddpw-launch launched the script in its own process: its start-up counts from then.
    assert float((tmp_path / "launched.txt").read_text()) > 0
    assert re.search(r"^\[ddpw\] goodput [\d.]+%: run [\d.]+ s of [\d.]+ s \(start-up [\d.]+ s, "
                     r"from the launch to its start\)$", err, re.MULTILINE), err


@pytest.mark.parametrize(("body", "status"), [
    ("os.kill(os.getpid(), signal.SIGTERM) if rank == 1 else time.sleep(30)", 143),
    ("os.kill(os.getpid(), signal.SIGKILL) if rank == 1 else time.sleep(30)", 137),
    ("sys.exit(4) if rank == 1 else None", 4),
    ("None", 0),
])
def test_the_exit_status_is_the_failing_ranks(tmp_path, body, status):
    script = tmp_path / "s.py"
    script.write_text("import os, signal, sys, time\nrank = int(os.environ['RANK'])\n"
                      f"{body}\n")
    out = ddpw_launch("--platform", "cpu", "--n-procs", "2", str(script), cwd=tmp_path)
    assert out.returncode == status, out.stderr


# --- the plan as data, with the machine faked ------------------------------------------------

def machine(monkeypatch, cuda: int = 0, mps: bool = False, cpus: int = 8) -> None:
    facts = MachineFacts(cuda_devices=cuda, mps_available=mps, cpu_count=cpus,
                         env={k: v for k, v in os.environ.items()
                              if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")})
    monkeypatch.setattr(MachineFacts, "probe", classmethod(lambda cls: facts))


def dry_run(*args: str) -> dict:
    result = CliRunner().invoke(main, ["--dry-run", *args, "train.py", "--lr", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # its notes go to stderr


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_dry_run_cpu(monkeypatch):
    machine(monkeypatch, cpus=8)
    plan = dry_run("--platform", "cpu", "--n-procs", "4")
    assert plan["mode"] == "accelerate" and plan["world_size"] == 4
    assert plan["command"][1:3] == ["-m", "accelerate.commands.launch"]
    assert option(plan["command"], "--num_processes") == "4"
    assert "--multi_gpu" in plan["command"]
    assert plan["command"][-6:] == ["--module", "ddpw.entry", "--script", "train.py", "--lr",
                                    "1"]
    assert plan["env"] == {"OMP_NUM_THREADS": "2", "ACCELERATE_USE_CPU": "1",
                           "DDPW_HANG_TIMEOUT_S": "300"}
    assert plan["accelerate_config"]["use_cpu"] is True


def test_dry_run_gpu(monkeypatch):
    machine(monkeypatch, cuda=4)
    plan = dry_run("--platform", "gpu", "--n-gpus", "4", "--mixed-precision", "bf16")
    assert (plan["mode"], plan["world_size"], plan["platform"]) == ("accelerate", 4, "GPU")
    assert "ACCELERATE_USE_CPU" not in plan["env"]
    # The machine's 8 cores split among the 4 GPU processes, not torchrun's one thread each.
    assert plan["env"]["OMP_NUM_THREADS"] == "2" and plan["plan"]["threads_per_process"] == 2
    assert plan["accelerate_config"]["mixed_precision"] == "bf16"
    assert plan["accelerate_config"]["use_cpu"] is False


def test_dry_run_mps(monkeypatch):
    machine(monkeypatch, mps=True)
    plan = dry_run("--platform", "mps")
    assert (plan["mode"], plan["world_size"], plan["platform"]) == ("in_process", 1, "MPS")
    assert plan["command"] == [sys.executable, "-m", "ddpw.entry", "--script", "train.py",
                               "--lr", "1"]


@pytest.mark.parametrize(("cuda", "mps", "platform", "world"), [
    (4, False, "GPU", 4), (0, True, "MPS", 1), (0, False, "CPU", 8),
])
def test_dry_run_auto_picks_gpus_then_mps_then_every_core(monkeypatch, cuda, mps, platform,
                                                          world):
    machine(monkeypatch, cuda=cuda, mps=mps, cpus=8)
    plan = dry_run("--platform", "auto")
    assert (plan["platform"], plan["world_size"]) == (platform, world)
    assert dry_run()["platform"] == platform  # auto is the default


def test_dry_run_module(monkeypatch):
    machine(monkeypatch)
    # A name of its own: the check imports the package into this process.
    Path("dry_run_pkg").mkdir()
    Path("dry_run_pkg/__init__.py").write_text("")
    Path("dry_run_pkg/train.py").write_text("")
    result = CliRunner().invoke(main, ["--dry-run", "--platform", "cpu", "--n-procs", "2", "-m",
                                       "dry_run_pkg.train", "--x"])
    plan = json.loads(result.stdout)
    assert plan["command"][-5:] == ["--module", "ddpw.entry", "--module", "dry_run_pkg.train",
                                    "--x"]


def test_settings_come_from_a_config_file_and_flags_win(monkeypatch, tmp_path):
    machine(monkeypatch, cpus=8)
    toml = tmp_path / "c.toml"
    toml.write_text('platform = "cpu"\nn-procs = 4\ncpus_per_task = 3\n')
    plan = dry_run("--config", str(toml))
    assert plan["world_size"] == 4 and plan["env"]["OMP_NUM_THREADS"] == "3"
    assert dry_run("--config", str(toml), "--n-procs", "2")["world_size"] == 2
    yaml = tmp_path / "c.yaml"
    yaml.write_text("platform: cpu\nn_procs: 3\n")
    assert dry_run("--config", str(yaml))["world_size"] == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--platform", "tpu"], "Invalid value for '--platform': 'tpu' is not one of 'cpu', "
                            "'gpu', 'mps', 'slurm', 'auto'"),
    (["--n-procs", "0"], "Invalid value for '--n-procs': 0 is not in the range x>=1"),
    (["--mixed-precision", "fp8"], "Invalid value for '--mixed-precision'"),
    # ddpw's messages in the command's words: options, not PlatformConfig's fields.
    (["--platform", "gpu"], "--platform gpu needs CUDA GPUs, and this machine has none that "
                            "PyTorch can use (torch.cuda.device_count() is 0). Use --platform "
                            "cpu --n-procs N to run N CPU processes."),
    (["--platform", "gpu", "--n-procs", "2"],
     "--n-procs 2 is not valid: --platform gpu runs one process per GPU, and --n-gpus 1 sets "
     "their number. For 2 CPU processes: --platform cpu --n-procs 2."),
    (["--platform", "cpu", "--mixed-precision", "fp16"],
     "--mixed-precision fp16 is not valid: 'no' or 'bf16' on --platform cpu"),
    (["--platform", "cpu", "--n-nodes", "2"],
     "--node-rank is not set, and a job on --n-nodes 2 machines needs it"),
    (["--platform", "cpu", "--n-nodes", "2", "--node-rank", "2"],
     "--node-rank 2 is not valid: an integer from 0 to 1 (--n-nodes 2), or left out"),
    (["--platform", "cpu", "--n-nodes", "2", "--node-rank", "1"],
     "--master-addr is not set, and a job on --n-nodes 2 machines needs it"),
    (["--platform", "mps", "--n-nodes", "2"], "--n-nodes 2 is not valid: 1 on --platform mps"),
    (["--platform", "slurm", "--n-nodes", "1:2"],
     "--n-nodes 1:MAX is not valid: left out on --platform slurm: elastic jobs run on "
     "--platform cpu or --platform gpu machines"),
    (["--platform", "cpu", "--n-procs", "2", "--torch-compile", "--torch-compile-mode", "x"],
     "Invalid value for '--torch-compile-mode'"),
    (["--platform", "cpu", "--n-nodes", "3:2"],
     "'3:2': N must be at least 1, and MIN:MAX must have 1 <= MIN <= MAX"),
    (["--platform", "cpu", "--n-nodes", "two"], "'two' is neither N nor MIN:MAX"),
    (["--master-port", "70000"], "Invalid value for '--master-port'"),
    (["--config", "missing.toml"], "Invalid value for '--config'"),
])
def test_bad_flags_name_the_flag_and_what_is_valid(monkeypatch, args, message):
    machine(monkeypatch)
    result = CliRunner().invoke(main, [*args, "train.py"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "PlatformConfig" not in result.output and "Platform." not in result.output


@pytest.mark.parametrize(("message", "words"), [
    ("PlatformConfig.torch_compile=True on Platform.CPU needs a C++ compiler (or compile "
     "nothing: torch_compile=False).",
     "--torch-compile on --platform cpu needs a C++ compiler (or compile nothing: no "
     "--torch-compile)."),
    ("PlatformConfig.slurm_parameters={'mail_type': 'END', 'hint': True} is not valid",
     "--slurm-parameter mail_type=END --slurm-parameter hint=True is not valid"),
    ("PlatformConfig.master_addr='my host' does not resolve",
     "--master-addr 'my host' does not resolve"),
    ("PET_NNODES='x' in the environment (for PlatformConfig.n_nodes)",
     "PET_NNODES='x' in the environment (for --n-nodes)"),
    # A field that no option sets, and a field's name alone, stay as they are.
    ("PlatformConfig.seed=3, the partition", "PlatformConfig.seed=3, the partition"),
])
def test_messages_are_put_in_the_commands_words(message, words):
    assert _in_cli_words(message) == words


def test_a_config_file_with_unknown_settings_is_refused(monkeypatch, tmp_path):
    machine(monkeypatch)
    bad = tmp_path / "c.toml"
    bad.write_text("n_proc = 2\n")
    result = CliRunner().invoke(main, ["--config", str(bad), "train.py"])
    assert result.exit_code == 2
    assert "unknown settings ['n_proc']; valid: platform, n_procs" in result.output
    bad.write_text('platform = "tpu"\n')
    result = CliRunner().invoke(main, ["--config", str(bad), "train.py"])
    assert result.exit_code == 2 and result.exception is not None  # SystemExit, no traceback
    assert "Error: --platform tpu is not valid: one of --platform cpu, --platform gpu" in \
        result.output


def test_help_has_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "ddpw-launch --platform cpu --n-procs 2 train.py" in result.output
    assert "Exit status" in result.output
    # Each continued example is a line of its own, not one line with a gap.
    assert "--master-addr node0 \\\n        --master-port 29500" in result.output


def test_help_lists_every_option_once_under_its_heading():
    result = CliRunner().invoke(main, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    headings = [line for line in lines if re.fullmatch(r"[A-Z][\w ]*:", line)]
    assert headings == ["Where to run:", "Hangs:", "Several machines:", "SLURM:",
                        "Logs and output:", "Sweeps:", "Other:"]
    heading, listed = None, []
    for line in lines:
        if line in headings:
            heading = line[:-1]
        elif heading and (row := re.match(r"  (-\w, )?(--[\w-]+)", line)):
            listed.append((heading, row.group(2)))
    names = [name for _, name in listed]
    context = main.make_context("ddpw-launch", ["x.py"])
    every = [param.opts[-1] for param in main.get_params(context)
             if isinstance(param, click.Option)]
    assert sorted(names) == sorted(every) and len(set(names)) == len(names)
    assert ("Where to run", "--platform") in listed
    assert ("Several machines", "--node-rank") in listed
    assert ("SLURM", "--partition") in listed
    assert ("Logs and output", "--log-dir") in listed
    assert ("Sweeps", "--sweep") in listed
    assert ("Other", "--help") in listed
    # The help texts of every section start in one column.
    columns = {line.index(text) for line in lines
               for text in ("CPU processes per node", "SLURM partition.", "Show this message")
               if text in line}
    assert len(columns) == 1, columns


def test_config_fields_are_the_options_that_set_a_platform_config_field():
    assert FIELDS == ("platform", "n_procs", "n_gpus", "n_nodes", "cpus_per_task", "partition",
                      "timeout_min", "mem_gb", "account", "qos", "constraint", "exclusive",
                      "slurm_parameters", "requeue_signal", "signal_delay_s", "requeue_limit",
                      "name", "mixed_precision", "strategy", "shard_units", "torch_compile",
                      "torch_compile_mode", "node_rank", "master_addr", "master_port",
                      "rendezvous_timeout_s", "hang_timeout_s", "max_restarts")


def test_log_dir_defaults_to_the_job_folders_root():
    (log_dir,) = (param for param in main.params if param.name == "log_dir")
    assert log_dir.default == DEFAULT_ROOT == "./logs/console_logs"


def test_sigterm_to_ddpw_launch_pauses_a_ddpw_trainer_and_exits_75(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from pathlib import Path
        from jobs import SlowTrainer, artefacts, job
        from ddpw import Platform, PlatformConfig, Wrapper

        p = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
        Wrapper(p, artefacts()).start(SlowTrainer(job(Path("."), epochs=4)))
    """))
    launcher = subprocess.Popen([sys.executable, "-m", "ddpw", "--platform", "cpu",
                                 "--n-procs", "2", str(script)], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_mid_epoch(tmp_path, launcher)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == PAUSED_EXIT_STATUS, err
    assert ckpt.latest(tmp_path / "checkpoint", "ckpt").startswith("ckpt_1_batch")


def test_dry_run_slurm_shows_the_sbatch_parameters(monkeypatch):
    machine(monkeypatch)
    plan = dry_run("--platform", "slurm", "--n-nodes", "2", "--n-gpus", "4", "--partition",
                   "gpu", "--mem-gb", "64")
    assert plan["mode"] == "slurm" and plan["world_size"] == 8
    # Without --cpus-per-task: 8 cores for each GPU process (fewer at submission, where the
    # partition's nodes have fewer per GPU).
    assert plan["slurm"] == {"name": "DDPW", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 32,
                             "gpus_per_node": 4, "mem_gb": 64.0, "timeout_min": 2880,
                             "slurm_partition": "gpu", "slurm_signal_delay_s": 90,
                             "slurm_additional_parameters": {"signal": "USR2@90"},
                             "slurm_setup": ["export SUBMITIT_PREEMPT_SIGNAL=USR2"],
                             "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    assert plan["env"]["OMP_NUM_THREADS"] == "8" and plan["plan"]["threads_per_process"] == 8
    assert plan["env"]["ACCELERATE_MIXED_PRECISION"] == "no"
    explicit = dry_run("--platform", "slurm", "--n-gpus", "4", "--cpus-per-task", "2",
                       "--mixed-precision", "bf16")
    assert explicit["slurm"]["cpus_per_task"] == 8 and explicit["env"]["OMP_NUM_THREADS"] == "2"
    assert explicit["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert option(plan["command"], "--num_machines") == "2"
    assert plan["per_node_args"][0::2] == ["--machine_rank", "--main_process_ip",
                                           "--main_process_port"]
    # The range that ddpw.plan.rendezvous_port draws from.
    assert plan["per_node_args"][-1].startswith("<a port from 20000 to 32767 derived from")


def test_a_slurm_dry_run_names_the_settings_left_at_their_defaults(monkeypatch):
    machine(monkeypatch)
    given = CliRunner().invoke(main, ["--dry-run", "--platform", "slurm", "--n-gpus", "0",
                                      "--timeout-min", "60", "train.py"])
    assert given.exit_code == 0, given.output
    assert json.loads(given.stdout)["slurm"]["slurm_partition"] == "general"
    assert given.stderr == ("[ddpw] not given, so at their defaults: --partition general, "
                            "--requeue-signal SIGUSR2, --signal-delay-s 90.\n")


def test_a_dry_run_plans_a_gpu_job_on_a_machine_without_gpus(monkeypatch):
    machine(monkeypatch, cuda=0, cpus=2)
    result = CliRunner().invoke(main, ["--dry-run", "--platform", "gpu", "--n-gpus", "2",
                                       "train.py"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["platform"], plan["world_size"], option(plan["command"], "--num_processes")) == (
        "GPU", 2, "2")
    assert result.stderr == ("[ddpw] this machine has no CUDA GPU that PyTorch can use: the plan "
                             "is for one with 2.\n")
    # Run, not dry: refused as before, in the command's words.
    refused = CliRunner().invoke(main, ["--platform", "gpu", "--n-gpus", "2", "train.py"])
    assert refused.exit_code == 2 and "Error: --platform gpu needs CUDA GPUs" in refused.output


def test_more_processes_than_cores_is_said_once(monkeypatch):
    machine(monkeypatch, cpus=2)
    result = CliRunner().invoke(main, ["--dry-run", "--platform", "cpu", "--n-procs", "3",
                                       "train.py"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ("[ddpw] 3 processes share this machine's 2 core(s), 1 compute "
                             "thread(s) each: they take turns, each slower than it would run "
                             "alone.\n")
    assert CliRunner().invoke(main, ["--dry-run", "--platform", "cpu", "--n-procs", "2",
                                     "train.py"]).stderr == ""


def test_slurm_pass_through_options(monkeypatch):
    machine(monkeypatch)
    plan = dry_run("--platform", "slurm", "--n-gpus", "0", "--account", "proj", "--qos", "low",
                   "--constraint", "avx512", "--exclusive", "--slurm-parameter", "mail_type=END",
                   "--slurm-parameter", "hint", "--requeue-signal", "SIGUSR1",
                   "--signal-delay-s", "120", "--requeue-limit", "3")
    slurm = plan["slurm"]
    assert (slurm["slurm_account"], slurm["slurm_qos"], slurm["slurm_constraint"]) == (
        "proj", "low", "avx512")
    assert slurm["slurm_exclusive"] is True
    assert slurm["slurm_additional_parameters"] == {"signal": "USR1@120", "mail_type": "END",
                                                    "hint": True}


HELLO = """
import os, sys
rank = os.environ["RANK"]
print(f"hello from {rank} of {os.environ['WORLD_SIZE']}", sys.argv[1:])
print(f"note from {rank}", file=sys.stderr)
"""


def test_a_toml_config_a_flag_all_ranks_log_dir_and_a_module_in_a_real_run(tmp_path):
    (tmp_path / "greet").mkdir()
    (tmp_path / "greet" / "__init__.py").write_text("")
    (tmp_path / "greet" / "hello.py").write_text(HELLO)
    config = tmp_path / "c.toml"
    config.write_text('platform = "cpu"\nn-procs = 3\nname = "toml-job"\n')
    out = subprocess.run([CONSOLE_SCRIPT, "--config", str(config), "--n-procs", "2",
                          "--all-ranks", "--log-dir", "elsewhere", "-m", "greet.hello", "--x"],
                         cwd=tmp_path, text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):  # the flag won over the file's n-procs
        assert f"[rank{rank}]: hello from {rank} of 2 ['--x']" in out.stdout.splitlines()
        assert f"[rank{rank}]: note from {rank}" in out.stderr.splitlines()
    assert not (tmp_path / "logs").exists()
    (folder,) = (tmp_path / "elsewhere").iterdir()
    assert re.fullmatch(r"toml-job-\d{8}-\d{6}", folder.name), folder.name
    for rank in (0, 1):
        assert (folder / f"rank-{rank}.stdout.log").read_text() == (
            f"hello from {rank} of 2 ['--x']\n")
        assert (folder / f"rank-{rank}.stderr.log").read_text() == f"note from {rank}\n"


def test_a_yaml_config_in_a_real_run_shows_the_main_rank_alone(tmp_path):
    (tmp_path / "hello.py").write_text(HELLO)
    (tmp_path / "c.yaml").write_text("platform: cpu\nn_procs: 2\nname: yaml-job\n")
    out = ddpw_launch("--config", "c.yaml", "hello.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "[rank0]: hello from 0 of 2 []" in out.stdout.splitlines()
    assert "from 1" not in out.stdout + out.stderr
    (folder,) = (tmp_path / "logs" / "console_logs").iterdir()
    assert folder.name.startswith("yaml-job-")
    assert (folder / "rank-1.stdout.log").read_text() == "hello from 1 of 2 []\n"


def test_a_signal_delay_longer_than_the_time_limit_is_refused(monkeypatch):
    machine(monkeypatch)
    refused = CliRunner().invoke(main, ["--platform", "slurm", "--n-gpus", "0", "--timeout-min",
                                        "1", "--dry-run", "train.py"])
    assert refused.exit_code == 2
    assert "--timeout-min 1 is not valid: more than --signal-delay-s 90" in refused.output


def test_one_process_gets_the_threads_it_asks_for(tmp_path):
    script = tmp_path / "threads.py"
    script.write_text("import torch; print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-m", "ddpw", "--platform", "cpu", "--n-procs", "1",
                           "--cpus-per-task", "1", str(script)], cwd=tmp_path, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


#: A SLURM configuration whose controller cannot answer: ``{host}`` does not resolve, or nothing
#: listens on ``{port}`` (a short MessageTimeout: sinfo gives up on a refused connection at once).
NO_CONTROLLER = """ClusterName=gone
SlurmctldHost={host}
SlurmctldPort={port}
MessageTimeout=1
AuthType=auth/munge
NodeName=n1 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES
"""


def test_no_slurm_controller_answering_is_one_line_naming_the_command(slurm, tmp_path):
    """SLURM's commands are installed (the test cluster's), but the controller that the
    configuration names cannot be reached: real sinfo, whose errors (ten lines of retries when
    the name does not resolve) become one line."""
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    runs = {}
    for host, why in (("127.0.0.1", "slurm_load_partitions: Unable to contact slurm controller "
                                    "(connect failure)"),
                      ("no-such-controller.invalid",
                       'slurm_set_addr: Unable to resolve "no-such-controller.invalid"')):
        conf = tmp_path / f"{host}.conf"
        conf.write_text(NO_CONTROLLER.format(host=host, port=closed))
        runs[why] = subprocess.Popen(
            [sys.executable, "-m", "ddpw", "--platform", "slurm", "--n-gpus", "0", "train.py"],
            cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**slurm, "SLURM_CONF": str(conf)})
    for why, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert (run.returncode, out) == (2, ""), err
        assert err == (f"Error: no SLURM controller answered `sinfo -h -o '%R %D %c %G'` ({why}): "
                       f"submit from a machine of the cluster, or check SLURM_CONF and that "
                       f"slurmctld is running.\n")
    assert not (tmp_path / "logs").exists(), "a job folder was made"
