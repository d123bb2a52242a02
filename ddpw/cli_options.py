"""``ddpw-launch``'s options as :class:`~ddpw.platform.PlatformConfig` fields, and back.

One way, the settings that the command line and a ``--config`` file give become the fields of
a config (:func:`platform_settings`). The other way, ddpw's messages, which name fields as a
Python user writes them (``PlatformConfig.n_procs=2``, ``Platform.GPU``,
``PlatformConfig(platform=...)``), are put in the command's own words (``--n-procs 2``,
``--platform gpu``) by :func:`in_cli_words`, from one mapping of each field to its option.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError
from .plan import LaunchMode, LaunchPlan, MachineFacts, auto_platform
from .platform import Platform, PlatformConfig


class Timeout(click.ParamType):
    """A positive number of seconds, or ``off``."""

    name = "seconds|off"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float | str:
        if value == "off" or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number of seconds nor 'off'", param, ctx)


class Nodes(click.ParamType):
    """``N`` machines, or ``MIN:MAX`` for an elastic job: ``(MIN or None, MAX)``."""

    name = "nodes"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int | None, int]:
        if isinstance(value, tuple):
            return value
        low, sep, high = str(value).partition(":")
        try:
            fewest, most = (int(low), int(high)) if sep else (None, int(low))
        except ValueError:
            self.fail(f"{value!r} is neither N nor MIN:MAX", param, ctx)
        if most < 1 or (fewest is not None and not 1 <= fewest <= most):
            self.fail(f"{value!r}: N must be at least 1, and MIN:MAX must have 1 <= MIN <= MAX",
                      param, ctx)
        return fewest, most


class Names(click.ParamType):
    """A comma-separated list of names: ``Block,Other`` becomes ``("Block", "Other")``."""

    name = "names"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, (tuple, list)):
            return tuple(value)
        names = tuple(name.strip() for name in str(value).split(",") if name.strip())
        if not names:
            self.fail(f"{value!r} names no class", param, ctx)
        return names


def script_sharding(p_config: PlatformConfig, plan: LaunchPlan) -> LaunchPlan:
    """The plan of a script that ``--strategy fsdp`` asks to shard: Accelerate's own FSDP2
    (``accelerate launch --use_fsdp --fsdp_version 2``) on GPUs, which the script's own
    ``Accelerator()`` takes. A world of one has nothing to shard (:func:`ddpw.plan.resolve_plan`
    says so).

    :raises ConfigError: on CPUs, where Accelerate has no FSDP.
    """
    if p_config.strategy != "fsdp" or plan.mode not in (LaunchMode.ACCELERATE, LaunchMode.SLURM):
        return plan
    if not p_config.uses_gpus:
        raise ConfigError(
            "PlatformConfig.strategy='fsdp' for a script on CPUs: Accelerate has no FSDP on "
            "CPUs (an Accelerator(cpu=True) trains with DDP, without a word). A ddpw Trainer "
            "shards on CPUs itself: run it through Wrapper(PlatformConfig(platform=Platform."
            "CPU, strategy='fsdp'), ...), or give the script GPUs.")
    units = p_config.shard_units
    wrap = (("--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
             "--fsdp_transformer_layer_cls_to_wrap", ",".join(units)) if units else ())
    args = ("--use_fsdp", "--fsdp_version", "2", *wrap)
    return dataclasses.replace(plan, launch_args=(*plan.launch_args, *args))


def slurm_parameters(given: tuple[str, ...]) -> dict[str, Any] | None:
    """``--slurm-parameter KEY=VALUE`` options as a dict (``KEY`` alone is a flag)."""
    if not given:
        return None
    parameters: dict[str, Any] = {}
    for item in given:
        key, sep, value = item.partition("=")
        parameters[key.strip().replace("-", "_")] = value if sep else True
    return parameters


def platform_settings(options: dict[str, Any], config_file: str | None, fields: tuple[str, ...],
             facts: MachineFacts) -> dict[str, Any]:
    """The PlatformConfig fields: the config file's, overridden by the options given.

    :param fields: the fields that the options set, which alone a config file may hold.
    :raises ConfigError: for a platform that the file names and that is none.
    """
    settings = read_config(Path(config_file), fields) if config_file else {}
    if options.get("slurm_parameters") and settings.get("slurm_parameters"):
        options["slurm_parameters"] = {**settings["slurm_parameters"],
                                       **options["slurm_parameters"]}
    settings.update({k: v for k, v in options.items() if v is not None})
    if settings.get("hang_timeout_s") == "off":  # None would read as "not given" above
        settings["hang_timeout_s"] = None
    if "n_nodes" in settings:  # N or MIN:MAX, from the command line or the file
        settings["min_nodes"], settings["n_nodes"] = Nodes().convert(
            settings["n_nodes"], None, None)
        if settings["min_nodes"] is None:
            del settings["min_nodes"]
    platform = str(settings.get("platform", "auto")).lower()
    if platform == "auto":
        settings = {**auto_platform(facts), **{k: v for k, v in settings.items()
                                               if k != "platform"}}
    else:
        settings["platform"] = Platform.parse(platform)
    return settings


def read_config(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """The settings of a TOML or YAML file, with dashes in their names made underscores."""
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise click.BadParameter(f"{path} is neither .toml nor .yaml/.yml",
                                     param_hint="--config")
    except (ValueError, ImportError) as error:  # both parsers' errors are ValueErrors
        raise click.BadParameter(f"cannot read {path}: {error}", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a table of settings",
                                 param_hint="--config")
    settings = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise click.BadParameter(f"{path} has unknown settings {unknown}; valid: "
                                 f"{', '.join(fields)}", param_hint="--config")
    return settings


#: A value as ddpw's messages write it: a Python literal, a platform, or a word (``N``).
_VALUE = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\{[^}]*\}|-?\w+(?:\.\w+)*"


def in_cli_words(message: str, options: Mapping[str, str]) -> str:
    """``message`` with its fields in the command's words: ``PlatformConfig.n_procs=2`` and
    ``n_procs=2`` become ``--n-procs 2``; ``PlatformConfig.node_rank``, ``--node-rank``;
    ``PlatformConfig(platform=Platform.CPU, n_procs=N)``, ``--platform cpu --n-procs N``;
    ``Platform.GPU``, ``--platform gpu``; ``None``, "left out".

    A field's bare name stays as it is (``partition`` is a word too), and so does a field
    that no option sets.

    :param options: each field that an option sets, with that option's name.
    """
    names = "|".join([*sorted(options, key=len, reverse=True), "min_nodes"])
    pattern = re.compile(
        rf"PlatformConfig\((?P<call>[^()]*)\)"
        rf"|PlatformConfig\.(?P<field>{names})\b(?:=(?P<value>{_VALUE}))?"
        rf"|\b(?P<bare>{names})=(?P<bare_value>{_VALUE})"
        rf"|\bPlatform\.(?P<platform>{'|'.join(Platform.__members__)})\b"
        rf"|\bNone\b")

    def setting(field: str, value: str | None) -> str:
        if field == "min_nodes":  # no option of its own: the MIN of --n-nodes MIN:MAX
            return f"--n-nodes {'MIN' if value is None else value}:MAX"
        if field not in options:
            return f"{field}={value}" if value is not None else f"PlatformConfig.{field}"
        option = options[field]
        if value is None:
            return option
        if value.startswith("Platform."):
            return f"{option} {value.removeprefix('Platform.').lower()}"
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return f"{option} {value}"  # a word that stands for a number, N
        if literal is True:
            return option  # a flag
        if literal is False or literal is None:
            return f"no {option}"
        if isinstance(literal, dict):
            return " ".join(f"{option} {shlex.quote(f'{key}={item}')}"
                            for key, item in literal.items())
        return f"{option} {shlex.quote(str(literal))}"

    def replace(found: re.Match[str]) -> str:
        if found["call"] is not None:
            pairs = [part.partition("=") for part in found["call"].split(", ") if part]
            return " ".join(setting(key.strip(), value.strip()) for key, _, value in pairs)
        if found["field"] is not None:
            return setting(found["field"], found["value"])
        if found["bare"] is not None:
            return setting(found["bare"], found["bare_value"])
        if found["platform"] is not None:
            return setting("platform", f"Platform.{found['platform']}")
        return "left out"

    return pattern.sub(replace, message)
