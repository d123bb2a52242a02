"""A sweep's grid: the product of its ``NAME=V1,V2`` options, each point's name, and the script
arguments with a point's values put in for their ``{NAME}`` placeholders.

Everything here is data, checked before any process starts: an option without ``=`` or values,
a placeholder that no option fills, an option that no argument uses (a warning), a grid above
:data:`MAX_POINTS`, and two points that would write to one checkpoint folder.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError

#: The most points a sweep runs without ``--max-points`` (``max_points=``) said to be more: a
#: typing slip (``--sweep seed=1,...,1000`` for ``1,...,10``) should not fill a cluster's queue.
MAX_POINTS = 256

#: The placeholder that names the point itself (``ckpts/{task}``), for folders of its own.
TASK = "task"

#: A placeholder in a script's argument: ``{NAME}``, NAME a Python identifier (``{{`` is a
#: literal brace, as in :meth:`str.format`).
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")

#: Script options whose value is a folder that a point writes its checkpoints to: two points
#: given the same one would overwrite each other's (``--checkpoint-dir``, ``--ckpt_path``,
#: ``--output-dir``...).
_CHECKPOINT_OPTION = re.compile(r"^--?[\w-]*(checkpoint|ckpt|output[-_]dir)[\w-]*$", re.I)


def parse(options: Sequence[str]) -> dict[str, list[str]]:
    """The grid's axes from ``--sweep`` options, ``NAME=V1,V2,...`` each, in their order.

    :raises ConfigError: for an option without ``=``, without a name or values, a name that is
        not an identifier or is ``task``, or a name given twice.
    """
    axes: dict[str, list[str]] = {}
    for option in options:
        name, equals, values = option.partition("=")
        name = name.strip()
        if not equals:
            raise ConfigError(f"--sweep {option!r}: needs NAME=V1,V2,... (e.g. --sweep "
                              f"lr=0.1,0.01).")
        if not name.isidentifier() or name == TASK:
            raise ConfigError(f"--sweep {option!r}: the name must be a Python identifier other "
                              f"than {TASK!r} (it is the {{{TASK}}} placeholder's own), e.g. "
                              f"--sweep lr=0.1,0.01.")
        listed = [value.strip() for value in values.split(",")]
        if not values.strip() or not all(listed):
            raise ConfigError(f"--sweep {option!r}: needs one value or more, separated by "
                              f"commas, none of them empty (e.g. --sweep {name}=1,2,3).")
        if name in axes:
            raise ConfigError(f"--sweep {name}= is given twice: give its values in one "
                              f"option, --sweep {name}={','.join(axes[name] + listed)}.")
        axes[name] = listed
    return axes


def points(axes: Mapping[str, Sequence[Any]], max_points: int = MAX_POINTS
           ) -> list[dict[str, Any]]:
    """Every point of the grid: the product of the axes, the last axis varying fastest (as
    nested loops in the order given).

    :raises ConfigError: for an axis without values, or more points than ``max_points``.
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"sweep grid {name!r}: needs a list of one value or more, got "
                              f"{values!r}.")
    size = 1
    for values in axes.values():
        size *= len(values)
    if size > max_points:
        shape = " x ".join(f"{len(values)} ({name})" for name, values in axes.items())
        raise ConfigError(f"the sweep has {size} points ({shape}), more than the limit of "
                          f"{max_points}: give --max-points {size} (max_points={size}) if "
                          f"that many is meant.")
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def task_name(index: int, point: Mapping[str, Any]) -> str:
    """A point's name, for its folders: its index in the grid and its values
    (``2-lr_0.1-seed_1``), with nothing that a file name or a shell would trip on."""
    words = [f"{name}_{value}" for name, value in point.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join([str(index), *words]))[:200]


def placeholders(args: Sequence[str]) -> set[str]:
    """The names of the placeholders in ``args``."""
    return {match.group(1) for arg in args for match in _PLACEHOLDER.finditer(arg)}


def check_script_args(args: Sequence[str], axes: Mapping[str, Sequence[Any]]) -> list[str]:
    """Check a script's arguments against the grid; return the warnings to show (an axis that
    no argument uses: its points run the same command, unless the script reads the value some
    other way).

    :raises ConfigError: for a placeholder that no ``--sweep`` fills.
    """
    used = placeholders(args)
    unfilled = sorted(used - set(axes) - {TASK})
    if unfilled:
        raise ConfigError(f"the script's arguments use {{{unfilled[0]}}}, and no --sweep "
                          f"{unfilled[0]}=... gives it values (sweeps: "
                          f"{', '.join(axes) or 'none'}; {{{TASK}}} names the point).")
    return [f"--sweep {name}=... is used by no argument of the script (no {{{name}}}): its "
            f"points run the same command." for name in axes if name not in used]


def fill(args: Sequence[str], point: Mapping[str, Any], task: str) -> list[str]:
    """``args`` with the point's values (and its name, for ``{task}``) in place of their
    placeholders."""
    values = {**{name: str(value) for name, value in point.items()}, TASK: task}
    return [_PLACEHOLDER.sub(lambda match: values[match.group(1)], arg) for arg in args]


def checkpoint_folders(args: Sequence[str]) -> list[tuple[str, str]]:
    """The checkpoint-like options among a script's arguments (``--checkpoint-dir X`` or
    ``--checkpoint-dir=X``), as ``(option, value)``."""
    found = []
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if not _CHECKPOINT_OPTION.match(option):
            continue
        if equals:
            found.append((option, value))
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            found.append((option, args[i + 1]))
    return found


def check_distinct(folders: Mapping[str, str | None], what: str) -> None:
    """Refuse two points that would write their checkpoints to one folder.

    :param folders: each point's checkpoint folder, by the point's name (``None``: none).
    :param what: the argument or field that sets the folder, for the message.
    :raises ConfigError: naming the two points and the fix.
    """
    seen: dict[str, str] = {}
    for task, folder in folders.items():
        if folder is None:
            continue
        if folder in seen:
            raise ConfigError(f"sweep points {seen[folder]} and {task} would both write their "
                              f"checkpoints to {folder!r} ({what}): put {{{TASK}}} (or the "
                              f"swept names) in it, e.g. {folder.rstrip('/')}/{{{TASK}}}.")
        seen[folder] = task
