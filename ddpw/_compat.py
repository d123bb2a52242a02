"""What ddpw needs of the torch it runs with, and what it does without the newer parts.

``setup.cfg`` asks for ``torch>=2.3`` (:data:`TORCH_FLOOR`): checkpoints name the unsigned
dtypes that torch 2.3 added, and ``ddpw-launch`` uses torchrun's per-rank log options. pip
holds an installed ddpw to that floor; a source tree put on a machine's own torch (as
``scripts/gpu-check`` does) is not installed, so :func:`torch_floor_error` says it there.

One part that ddpw uses is newer. Since torch 2.9, torchrun's agent can be told which signals
to handle itself (``--signals-to-handle``); ddpw leaves it SIGHUP and SIGQUIT alone, and passes
the pause signals on to the job's processes itself. An older agent takes SIGTERM and SIGINT
over: ddpw still launches, and :func:`warn_if_agent_takes_signals` says once what that changes.
The part is looked for by name, not by version number, so that a build with it backported
counts as having it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Collection

#: The oldest torch that ddpw runs on: ``torch>=2.3`` in setup.cfg (a test keeps the two equal).
TORCH_FLOOR = (2, 3)
#: The first torch whose torchrun has ``--signals-to-handle`` (pytorch#160690).
AGENT_SIGNALS_SINCE = (2, 9)


def torch_version(text: str) -> tuple[int, int]:
    """The major and minor numbers of a torch version string: ``"2.11.0+cu130"`` -> ``(2, 11)``.

    :raises ValueError: for a string that does not start with two numbers.
    """
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"not a torch version: {text!r}")
    return int(match.group(1)), int(match.group(2))


def torch_floor_error(version: str) -> str | None:
    """Why torch ``version`` cannot run ddpw, or ``None`` when it can."""
    if torch_version(version) >= TORCH_FLOOR:
        return None
    floor = ".".join(map(str, TORCH_FLOOR))
    return f"ddpw needs torch>={floor}; this is torch {version}"


def agent_signals_warning(version: str, launch_config_fields: Collection[str]) -> str | None:
    """What a launch with torch ``version`` lacks when its torchrun's ``LaunchConfig`` has only
    ``launch_config_fields``: a one-line warning, or ``None`` when nothing is lacking."""
    if "signals_to_handle" in launch_config_fields:
        return None
    since = ".".join(map(str, AGENT_SIGNALS_SINCE))
    return (f"torch {version}'s torchrun cannot be told which signals to handle (torch {since} "
            f"can): its agent takes SIGTERM and SIGINT itself, so on either the job's processes "
            f"get one SIGTERM and 30 seconds to save their pause checkpoint before SIGKILL; "
            f"SIGUSR1 and SIGUSR2 pause as usual.")


def launch_config_fields() -> set[str]:
    """The fields of this torch's ``torch.distributed.launcher.api.LaunchConfig``, which
    torchrun's options fill."""
    from torch.distributed.launcher.api import LaunchConfig

    return {f.name for f in dataclasses.fields(LaunchConfig)}


def warn_if_agent_takes_signals() -> None:
    """Warn, once per process, when this torch's agent takes SIGTERM and SIGINT over
    (:func:`agent_signals_warning`)."""
    import torch

    message = agent_signals_warning(torch.__version__, launch_config_fields())
    if message is not None:
        # The same text from the same place is shown once by Python's default warning filter.
        warnings.warn(message, RuntimeWarning, stacklevel=2)
