"""ddpw, the Distributed Data Parallel Wrapper: write a model, data and a Trainer once, and run them
on one CPU process, several CPU processes, CUDA GPUs, Apple MPS or SLURM.

The seed's API lives in its own modules (``ddpw.platform``, ``ddpw.artefacts``, ``ddpw.job``,
``ddpw.wrapper``); the names are also importable from ``ddpw`` itself. They are loaded when first
used (:pep:`562`), so that ``import ddpw`` (and ``ddpw-launch --help``, ``--dry-run``, a SLURM
node on its way to ``accelerate launch``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import process
from ._lazy import lazy_names

process.note_requeue_signal()  # first, before torch is imported (see ddpw.process)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ loads them
    from .artefacts import ArtefactsConfig
    from .errors import ConfigError, JobHung, JobPaused, WorkerError
    from .job import JobConfig, JobMode
    from .platform import Platform, PlatformConfig
    from .trainer import Trainer
    from .utils import World, heartbeat, restartable, world
    from .wrapper import Wrapper

__version__ = "0.1.0"

__all__ = [
    "ArtefactsConfig",
    "ConfigError",
    "JobConfig",
    "JobHung",
    "JobMode",
    "JobPaused",
    "Platform",
    "PlatformConfig",
    "Trainer",
    "WorkerError",
    "World",
    "Wrapper",
    "__version__",
    "heartbeat",
    "restartable",
    "world",
]

#: The module that defines each public name of the package.
_HOMES = {
    "ArtefactsConfig": "artefacts",
    "ConfigError": "errors",
    "JobConfig": "job",
    "JobHung": "errors",
    "JobMode": "job",
    "JobPaused": "errors",
    "Platform": "platform",
    "PlatformConfig": "platform",
    "Trainer": "trainer",
    "WorkerError": "errors",
    "World": "utils",
    "Wrapper": "wrapper",
    "heartbeat": "utils",
    "restartable": "utils",
    "world": "utils",
}


__getattr__, __dir__ = lazy_names(__name__, _HOMES, __all__)
