"""ddpw, the Distributed Data Parallel Wrapper: write a model, data and a Trainer once, and run them
on one CPU process, several CPU processes, CUDA GPUs, Apple MPS or SLURM.

The seed's API lives in its own modules (``ddpw.platform``, ``ddpw.artefacts``, ``ddpw.job``,
``ddpw.wrapper``); the names are also importable from ``ddpw`` itself.
"""

from .artefacts import ArtefactsConfig
from .errors import ConfigError, JobPaused, WorkerError
from .job import JobConfig, JobMode
from .platform import Platform, PlatformConfig
from .trainer import Trainer
from .utils import World, world
from .wrapper import Wrapper

__version__ = "0.1.0"

__all__ = [
    "ArtefactsConfig",
    "ConfigError",
    "JobConfig",
    "JobMode",
    "JobPaused",
    "Platform",
    "PlatformConfig",
    "Trainer",
    "WorkerError",
    "World",
    "Wrapper",
    "__version__",
    "world",
]
