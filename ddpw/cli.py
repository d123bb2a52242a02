"""``ddpw-launch``: run any script on any platform, an unmodified Accelerate script included.

The command turns its options into a :class:`~ddpw.platform.PlatformConfig`, resolves it into a
:class:`~ddpw.plan.LaunchPlan` as :class:`~ddpw.wrapper.Wrapper` does, and starts the script on
every process with ``accelerate launch`` (or, for a world of one, in its own process).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import pkgutil
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import click
from click.formatting import term_len

from . import cli_sweep, environment, jobfolder
from .cli_options import (
    Names,
    Nodes,
    Timeout,
    in_cli_words,
    platform_settings,
    script_sharding,
    slurm_parameters,
)
from .errors import ConfigError, WorkerError
from .outcome import Outcome
from .plan import (
    RENDEZVOUS_PORTS,
    LaunchMode,
    LaunchPlan,
    MachineFacts,
    resolve_plan,
    shortfall,
)
from .platform import COMPILE_MODES, MIXED_PRECISION, REQUEUE_SIGNALS, STRATEGIES, PlatformConfig
from .process import exit_now
from .slurm import ON_INTERRUPT

EXAMPLES = """\b
Examples:
  ddpw-launch --platform cpu --n-procs 2 train.py --lr 0.1
  ddpw-launch --platform gpu --n-gpus 4 --mixed-precision bf16 train.py
  ddpw-launch -m my_package.train --epochs 3          (run a module)
  ddpw-launch --config cluster.toml train.py           (settings from a file)
  ddpw-launch --platform cpu --n-procs 4 --dry-run train.py
  ddpw-launch --platform cpu --n-nodes 2 --node-rank 0 --master-addr node0 \\
      --master-port 29500 --n-procs 2 train.py          (on every machine, its own rank)
  ddpw-launch --platform slurm --n-nodes 2 --n-gpus 4 --partition gpu \\
      --account proj --slurm-parameter mail_type=END train.py

\b
Exit status: the job's; 0 on success, the first failing rank's status otherwise,
75 when a ddpw Trainer paused, 76 when a rank hung (every rank's stack is in its
log), 128+N when signal N stopped the job.
On SLURM: 143 when the job was cancelled, 124 when it ran out of time.
"""

#: The headings of ``--help``, each with the options listed under it (by parameter name, shown
#: in the order they are declared); the rest are listed under "Other".
HELP_SECTIONS = {
    "Where to run": ("platform", "n_procs", "n_gpus", "n_nodes", "cpus_per_task",
                     "mixed_precision", "torch_compile", "torch_compile_mode"),
    "Hangs": ("hang_timeout_s",),
    "Several machines": ("node_rank", "master_addr", "master_port", "rendezvous_timeout_s",
                         "max_restarts"),
    "SLURM": ("partition", "timeout_min", "mem_gb", "account", "qos", "constraint", "exclusive",
              "slurm_parameters", "requeue_signal", "signal_delay_s", "requeue_limit", "no_wait",
              "on_interrupt"),
    "Logs and output": ("name", "log_dir", "all_ranks", "dry_run"),
    "Sweeps": ("sweeps", "parallelism", "max_points"),
}


class _SectionedCommand(click.Command):
    """A command whose help lists its options under the headings of :data:`HELP_SECTIONS`."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Hidden options have no record.
        records = {param.name: record for param in self.get_params(ctx)
                   if isinstance(param, click.Option) and (record := param.get_help_record(ctx))}
        sectioned = {name for names in HELP_SECTIONS.values() for name in names}
        sections = {heading: [name for name in records if name in names]
                    for heading, names in HELP_SECTIONS.items()}
        sections["Other"] = [name for name in records if name not in sectioned]
        # write_dl aligns the help texts of one call on its widest name (up to 30 characters):
        # padded to the widest of all, every section's texts start in the same column.
        width = min(max(term_len(name) for name, _ in records.values()), 30)
        for heading, names in sections.items():
            if names:
                with formatter.section(heading):
                    formatter.write_dl([(records[name][0].ljust(width), records[name][1])
                                        for name in names])


@click.command(cls=_SectionedCommand,
               context_settings={"help_option_names": ["-h", "--help"],
                                 "allow_interspersed_args": False},
               epilog=EXAMPLES)
@click.option("--platform", type=click.Choice(["cpu", "gpu", "mps", "slurm", "auto"],
                                              case_sensitive=False),
              help="Where to run [default: auto: every CUDA GPU, else MPS, else one CPU "
                   "process per core].")
@click.option("--n-procs", type=click.IntRange(min=1), help="CPU processes per node.")
@click.option("--n-gpus", type=click.IntRange(min=0),
              help="GPUs per node, one process each [default: 1; on SLURM, 0 when --n-procs is "
                   "given].")
@click.option("--n-nodes", type=Nodes(), metavar="N|MIN:MAX",
              help="Machines: on SLURM, asked for; on cpu and gpu, each runs this command "
                   "with its own --node-rank; MIN:MAX makes the job elastic (it goes on with "
                   "fewer when one is lost) [default: 1, or PET_NNODES / NNODES].")
@click.option("--cpus-per-task", type=click.IntRange(min=1),
              help="CPU cores (threads) per process [default: the cores split evenly; on "
                   "SLURM, 8 per GPU process (fewer where a node has fewer per GPU), 1 per CPU "
                   "process].")
@click.option("--partition", help="SLURM partition.")
@click.option("--timeout-min", type=click.IntRange(min=1), help="SLURM time limit, minutes.")
@click.option("--mem-gb", type=click.FloatRange(min=0, min_open=True),
              help="SLURM memory per node, GiB.")
@click.option("--account", help="SLURM account to charge.")
@click.option("--qos", help="SLURM quality of service.")
@click.option("--constraint", help="SLURM node features required.")
@click.option("--exclusive", is_flag=True, default=None, help="SLURM nodes not shared.")
@click.option("--slurm-parameter", "slurm_parameters", multiple=True, metavar="KEY=VALUE",
              help="Any other sbatch option, such as mail_type=END (repeatable; a bare KEY "
                   "gives a flag).")
@click.option("--requeue-signal", type=click.Choice(REQUEUE_SIGNALS),
              help="Signal SLURM sends ahead of a preemption or the time limit [default: "
                   "SIGUSR2]; a ddpw Trainer pauses on it and the job requeues itself.")
@click.option("--signal-delay-s", type=click.IntRange(min=1),
              help="Seconds before the time limit that SLURM sends it [default: 90].")
@click.option("--requeue-limit", type=click.IntRange(min=0),
              help="Times the job may requeue itself [default: 10].")
@click.option("--no-wait", is_flag=True,
              help="SLURM: print the job id and log folder and return once submitted.")
@click.option("--on-interrupt", type=click.Choice(ON_INTERRUPT), default="ask",
              show_default=True,
              help="SLURM: what Ctrl-C does while waiting (ask: cancel the job when there is "
                   "no terminal to ask on).")
@click.option("--name", help="The job's name (log folder, SLURM job name) [default: DDPW].")
@click.option("--mixed-precision", type=click.Choice(MIXED_PRECISION),
              help="Mixed precision for Accelerate [default: no].")
@click.option("--strategy", type=click.Choice(STRATEGIES),
              help="ddp: every process holds the model; fsdp: parameters, gradients and "
                   "optimiser state sharded (Accelerate's FSDP2 on GPUs) [default: ddp].")
@click.option("--shard-units", type=Names(), metavar="CLASS[,CLASS]",
              help="With --strategy fsdp, the block classes sharded as units (Accelerate's "
                   "transformer_layer_cls_to_wrap).")
@click.option("--torch-compile", is_flag=True, default=None,
              help="Compile the model (accelerate launch --dynamo_backend inductor).")
@click.option("--torch-compile-mode", type=click.Choice(COMPILE_MODES),
              help="torch.compile's mode [default: default].")
@click.option("--node-rank", type=click.IntRange(min=0),
              help="This machine's place among --n-nodes, from 0; node 0 holds the rendezvous "
                   "[default: PET_NODE_RANK / NODE_RANK].")
@click.option("--master-addr",
              help="Node 0's host name or address [default: PET_MASTER_ADDR / MASTER_ADDR].")
@click.option("--master-port", type=click.IntRange(1, 65535),
              help="Rendezvous port [default: one machine: a free one; several: "
                   "PET_MASTER_PORT / MASTER_PORT, else 29500].")
@click.option("--rendezvous-timeout-s", type=click.IntRange(min=1),
              help="Seconds the machines wait for each other at the start [default: 600].")
@click.option("--hang-timeout-s", type=Timeout(),
              help="Seconds a rank may go without progress (a Trainer's step or batch, or "
                   "ddpw.utils.heartbeat()) once it has made some, while the others wait, "
                   "before the job is ended as hung and every rank's stack logged; never "
                   "shortens a collective's own timeout; 'off' to never [default: 300].")
@click.option("--max-restarts", type=click.IntRange(min=0),
              help="Times the processes of a job on several machines start again after a "
                   "failure or a lost machine [default: 0, or PET_MAX_RESTARTS].")
@click.option("-m", "--module", is_flag=True,
              help="SCRIPT is a module name, run as with python -m.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML or YAML file with any of the settings above (underscores or dashes "
                   "in names); options given on the command line win.")
@click.option("--log-dir", default=jobfolder.DEFAULT_ROOT, show_default=True,
              type=click.Path(file_okay=False),
              help="Every rank's output is kept in LOG_DIR/NAME-TIME/rank-R.std{out,err}.log.")
@click.option("--all-ranks", is_flag=True,
              help="Show every rank's output on the console, each line prefixed with its rank "
                   "(by default, the main rank's alone).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (the accelerate launch command line, its environment and "
                   "config) as JSON and run nothing.")
@cli_sweep.sweep_options
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def main(script: str, script_args: tuple[str, ...], module: bool, config_file: str | None,
         log_dir: str, all_ranks: bool, dry_run: bool, no_wait: bool, on_interrupt: str,
         **options: Any) -> None:
    """Run SCRIPT (with SCRIPT_ARGS) on every process of a platform.

    SCRIPT may be any Python script: one that uses ddpw's Wrapper, or a plain Accelerate
    script, which gets a real distributed world (on CPUs, one gloo world of all the
    processes). A leftover `accelerate config` file on this machine is ignored.
    """
    facts = MachineFacts.probe()
    sweep = cli_sweep.take(options, script, script_args, module)
    options["slurm_parameters"] = slurm_parameters(options["slurm_parameters"])
    try:
        settings = platform_settings(options, config_file, FIELDS, facts)
        p_config = PlatformConfig(**settings)
        with warnings.catch_warnings(record=True) as notes:  # shown below, in the CLI's words
            warnings.simplefilter("always")
            plan = resolve_plan(p_config, facts, for_this_machine=not dry_run)
        plan = script_sharding(p_config, plan)
    except ConfigError as error:
        raise click.UsageError(_in_cli_words(str(error))) from None
    _refuse_what_python_would(script, module)
    for note in notes:
        click.echo(f"[ddpw] {_in_cli_words(str(note.message))}", err=True)
    # ddpw's entry point runs the script in every process, and ends each one cleanly.
    entry = ["--module", "ddpw.entry", "--module" if module else "--script", script,
             *script_args]
    if sweep.sweeps:  # the script once per point of a grid
        sys.exit(cli_sweep.run(sweep, p_config, plan, settings, log_dir, dry_run, no_wait,
                               on_interrupt, lambda args: _describe(plan, [*entry[:4], *args])))
    if dry_run:
        click.echo(json.dumps(_describe(plan, entry), indent=2))
        for line in _dry_run_notes(p_config, plan, facts, settings):
            click.echo(f"[ddpw] {_in_cli_words(line)}", err=True)
        return
    if plan.mode is LaunchMode.SLURM:
        if not module:  # the nodes may start elsewhere than here
            entry[3] = str(Path(script).resolve())
        sys.exit(_submit(p_config, plan, entry, log_dir, no_wait, on_interrupt, all_ranks))
    if plan.mode is not LaunchMode.ACCELERATE:
        # A world of one, or already inside a launch: the script runs in this process (one of
        # its own would import torch a second time). Imported here, not above, so that --help
        # and --dry-run never import torch.
        import torch

        from .worker import run_script

        os.environ.update(plan.env)
        if plan.mode is LaunchMode.IN_PROCESS:
            # A Wrapper in the script runs in place, in this world of one, whatever its config
            # asks for: the user asked for one process (it warns, as under a larger launch).
            os.environ[environment.ONE_PROCESS_LAUNCH] = str(os.getpid())
        if plan.threads_per_process is not None:
            torch.set_num_threads(plan.threads_per_process)
        run_script(script, list(script_args), module=module, end_with_parent=False)
    name = settings.get("name", "DDPW")
    folder = jobfolder.make(log_dir, name)
    meeting = plan.rendezvous
    click.echo(f"[ddpw] {_where(plan)}; every rank's output in {folder}", err=True)
    from .launcher import Logs, run_accelerate  # not for --help and --dry-run: they are light

    logs = Logs(folder, all_ranks=all_ranks, first_rank=plan.first_rank,
                node=meeting.node_rank if meeting else None)
    try:
        outcome = run_accelerate(plan, entry, logs)
    except ConfigError as error:  # the machines did not meet
        click.echo(f"Error: {_in_cli_words(str(error))}", err=True)
        exit_now(2)
    # Finalising an interpreter that has imported torch takes about half a second, for nothing.
    exit_now(_exit_status(outcome, folder, all_ranks))


#: Each :class:`~ddpw.platform.PlatformConfig` field that an option sets, with the option's name,
#: in the order they are declared: the settings a --config file may hold, and the words that
#: ddpw's messages about the fields are put in (:func:`~ddpw.cli_options.in_cli_words`).
OPTIONS = {param.name: param.opts[-1] for param in main.params
           if param.name in {field.name for field in dataclasses.fields(PlatformConfig)}}
FIELDS = tuple(OPTIONS)

#: The SLURM settings that every job has, which a dry run names where they were not given.
SLURM_DEFAULTS = ("partition", "timeout_min", "requeue_signal", "signal_delay_s")


def _in_cli_words(message: str) -> str:
    return in_cli_words(message, OPTIONS)


def _dry_run_notes(p_config: PlatformConfig, plan: LaunchPlan, facts: MachineFacts,
                   settings: dict[str, Any]) -> list[str]:
    """What a dry run says beside the plan: what this machine lacks to run it (the plan may
    be for another), and the SLURM settings that were not given and are at their defaults."""
    notes = []
    lacking = shortfall(p_config, facts, in_place=plan.mode is LaunchMode.IN_PLACE)
    if lacking is not None:
        notes.append(f"{lacking[0]}.")
    defaults = [f"PlatformConfig.{name}={getattr(p_config, name)!r}" for name in SLURM_DEFAULTS
                if name not in settings]
    if plan.mode is LaunchMode.SLURM and defaults:
        notes.append(f"not given, so at their defaults: {', '.join(defaults)}.")
    return notes


def _refuse_what_python_would(script: str, module: bool) -> None:
    """End with ``python``'s own one-line message and status when it would refuse to run
    ``script`` (a file that cannot be opened, a folder without ``__main__``, a module that
    cannot be found), before any process starts: every rank would fail on it."""
    if module:
        # As `python -m` does, and so every rank's `python -m ddpw.entry`: the module may be
        # in the current folder (the console script's own import path lacks it).
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        problem, status = _module_problem(script), 1
    else:
        problem, status = _script_problem(script), 2
    if problem is not None:
        click.echo(f"ddpw-launch: {problem}", err=True)
        sys.exit(status)


def _script_problem(script: str) -> str | None:
    """Why ``python SCRIPT`` would not start, in its words; ``None`` when it would."""
    path = Path(script).absolute()  # unnormalised, as python shows it
    if path.is_dir():
        importer = pkgutil.get_importer(str(path))
        if importer is None or importer.find_spec("__main__") is None:
            return f"can't find '__main__' module in '{path}'"
        return None
    try:
        path.open("rb").close()
    except OSError as error:
        return f"can't open file '{path}': [Errno {error.errno}] {error.strerror}"
    return None


def _module_problem(name: str) -> str | None:
    """Why ``python -m NAME`` would not start, in its words; ``None`` when it would.

    The module's parent packages are imported, as python does. One whose own code fails is
    not refused here: every rank reports its traceback, as python would show it.
    """
    if name.startswith("."):
        return "Relative module names not supported"
    parent = name.rpartition(".")[0]
    if parent:
        try:
            importlib.import_module(parent)
        except ImportError as error:
            # A missing parent is reported below; an import inside the package that fails is
            # the package's own error.
            if error.name is None or not (error.name == parent
                                          or parent.startswith(error.name + ".")):
                return None
        except Exception:
            return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        return (f"Error while finding module specification for {name!r} "
                f"({type(error).__name__}: {error})")
    if spec is None:
        return f"No module named {name}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        if name == "__main__" or name.endswith(".__main__"):
            return "Cannot use package as __main__ module"
        problem = _module_problem(f"{name}.__main__")
        return (f"{problem}; {name!r} is a package and cannot be directly executed"
                if problem else None)
    return None


def _submit(p_config: PlatformConfig, plan: LaunchPlan, entry: list[str], log_dir: str,
            no_wait: bool, on_interrupt: str, all_ranks: bool) -> int:
    """Submit the script to SLURM; wait for it unless ``no_wait``; return the exit status."""
    try:
        from .slurm.submission import submit

        submission = submit(p_config, plan, log_dir, script=entry[2:])
    except ConfigError as error:
        # What the cluster refuses is no misuse of the command: its one line, without the usage.
        click.echo(f"Error: {_in_cli_words(str(error))}", err=True)
        return 2
    if no_wait:
        click.echo(json.dumps({"job_id": submission.job_id, "folder": str(submission.folder),
                               "console_log": str(submission.console_log)}))
        return 0
    failed = None
    try:
        submission.wait(on_interrupt)
    except KeyboardInterrupt:
        return 130
    except WorkerError as error:
        failed = error
    status, failures = submission.exit_status()
    if failed is not None:
        # With a failing rank to show, its own stderr says more than the nodes' tracebacks.
        click.echo(f"[ddpw] {failed.message if failures else failed}", err=True)
    if status == 1 and failures:
        return _exit_status(Outcome(failures, None), submission.folder, all_ranks)
    if status:
        click.echo(f"[ddpw] SLURM job {submission.job_id} ended with status {status}; logs in "
                   f"{submission.folder}", err=True)
    return status


def _describe(plan: LaunchPlan, entry: list[str]) -> dict[str, Any]:
    """The plan as data, for --dry-run."""
    if plan.mode in (LaunchMode.ACCELERATE, LaunchMode.SLURM):
        # On SLURM, each node adds its --machine_rank, --main_process_ip and --main_process_port.
        command = plan.command("ACCELERATE_CONFIG.json", entry)
    else:
        command = [sys.executable, "-m", *entry[1:]]
    per_node = {}
    if plan.mode is LaunchMode.SLURM:
        per_node = {"per_node_args": [
            "--machine_rank", "<SLURM_NODEID>", "--main_process_ip", "<the first node's address>",
            "--main_process_port", "<a port from {} to {} derived from the job id, or a free one "
            "where node 0 cannot bind it>".format(*RENDEZVOUS_PORTS)]}
    meeting = plan.rendezvous
    if meeting is not None:
        per_node = {"rendezvous": {
            "nodes": meeting.nodes, "node_rank": meeting.node_rank,
            "endpoint": meeting.endpoint, "timeout_s": meeting.timeout_s,
            "from_environment": meeting.read, "first_rank": plan.first_rank,
            "elastic": meeting.elastic, "nnodes": meeting.nnodes,
            "max_restarts": meeting.max_restarts,
            "per_node_args": ["--machine_rank", "<the node's rank, 0 on "
                              f"{meeting.master_addr}>"]}}
    return {"mode": plan.mode.value, "platform": plan.platform.name,
            "world_size": plan.world_size, "command": command,
            "shell": shlex.join(command), "env": plan.env,
            "accelerate_config": plan.accelerate_config,
            "standalone_rendezvous": plan.standalone, "slurm": plan.slurm,
            "plan": {k: v for k, v in dataclasses.asdict(plan).items()
                     if k in ("threads_per_process", "accelerator_kwargs")}, **per_node}


def _where(plan: LaunchPlan) -> str:
    """What this launch starts, for the line before it begins."""
    meeting = plan.rendezvous
    if meeting is None:
        return f"{plan.world_size} processes"
    if meeting.elastic:  # the rendezvous numbers the machines and ranks, anew at each restart
        return (f"{plan.world_size // meeting.nodes} processes here, on one of "
                f"{meeting.nnodes} machines meeting at {meeting.endpoint}")
    last = plan.first_rank + plan.world_size // meeting.nodes - 1
    return (f"node {meeting.node_rank} of {meeting.nodes}, ranks {plan.first_rank} to {last} "
            f"of {plan.world_size}, meeting at {meeting.endpoint}")


def _exit_status(outcome: Outcome, folder: Path, all_ranks: bool) -> int:
    status, said = jobfolder.exit_status(folder, outcome, all_ranks)
    for text in said:
        click.echo(text, err=True)
    return status
