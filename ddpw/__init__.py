"""ddpw, the Distributed Data Parallel Wrapper: write a model, data and a Trainer once, and run them
on one CPU process, several CPU processes, CUDA GPUs, Apple MPS or SLURM.

The seed's API lives in its own modules (``ddpw.platform``, ``ddpw.artefacts``, ``ddpw.job``,
``ddpw.wrapper``); the names are also importable from ``ddpw`` itself.
"""

from . import process

process.note_requeue_signal()  # first, before torch is imported (see ddpw.process)

from .artefacts import ArtefactsConfig  # noqa: E402
from .errors import ConfigError, JobPaused, WorkerError  # noqa: E402
from .job import JobConfig, JobMode  # noqa: E402
from .platform import Platform, PlatformConfig  # noqa: E402
from .trainer import Trainer  # noqa: E402
from .utils import World, restartable, world  # noqa: E402
from .wrapper import Wrapper  # noqa: E402

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
    "restartable",
    "world",
]
