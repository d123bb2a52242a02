"""What ends a ddpw job other than success: the errors it raises on purpose, and the pause.

- :class:`ConfigError`: the job was never started; something in the configuration, the machine
  or the checkpoints on disk does not fit.
- :class:`WorkerError`: the job started and a rank failed; it carries that rank's number and
  traceback.
- :class:`JobPaused`: the job stopped at a step boundary and saved a checkpoint to resume from;
  a :class:`SystemExit` with status :data:`PAUSED_EXIT_STATUS` (75).
- :class:`JobHung`: a :class:`WorkerError`: a rank stopped making progress for
  ``PlatformConfig.hang_timeout_s`` while the others waited (:mod:`ddpw.hang`).
- :class:`PeerFailed`: raised on the ranks that stop because another rank failed, which reports
  the cause.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run, found before any process starts.

    The message names the field, the value given and what would be valid.
    """


class WorkerError(RuntimeError):
    """A rank of a started job raised an exception or died.

    :param rank: global rank of the first process that failed, or ``None`` when it is unknown.
    :param status: that process's exit status, when it died without a Python exception.
    :param details: the rank's formatted traceback, or what the launcher reported.
    """

    def __init__(self, message: str, rank: int | None = None, status: int | None = None,
                 details: str = "") -> None:
        super().__init__(message if not details else f"{message}\n\n{details}")
        #: The first line: what failed, without the details.
        self.message = message
        self.rank = rank
        self.status = status
        self.details = details


class JobHung(WorkerError):
    """The job hung: a rank made no progress for ``PlatformConfig.hang_timeout_s`` seconds while
    the others waited for it, and ddpw ended every process (:mod:`ddpw.hang`).

    :attr:`message` names the stuck rank(s), their host and where they stood; :attr:`details`
    gives every rank's main-thread stack. :attr:`rank` is the first stuck rank.

    :param stuck: every stuck rank.
    """

    def __init__(self, message: str, stuck: list[int], details: str = "") -> None:
        super().__init__(message, rank=stuck[0] if stuck else None, status=HUNG_EXIT_STATUS,
                         details=details)
        self.stuck = stuck


#: Exit status of every process of a job that hung (:mod:`ddpw.hang`), and of ``ddpw-launch``
#: then. Not 124, which ``ddpw-launch`` gives a SLURM job that ran out of time.
HUNG_EXIT_STATUS = 76

#: Exit status of a process whose training job paused (``EX_TEMPFAIL``: try again later).
PAUSED_EXIT_STATUS = 75


class JobPaused(SystemExit):
    """A training job stopped at a step boundary, on a signal or on request, and saved a checkpoint.

    A subclass of :class:`SystemExit`: left uncaught, it ends the script quietly with exit status
    :data:`PAUSED_EXIT_STATUS` (75), which tells a scheduler that the job can be started again.
    Restart it with ``JobConfig(start_at="latest")`` (or the checkpoint's name) to go on exactly
    where it stopped.

    :param checkpoint: the folder of the checkpoint written at the pause.
    """

    def __init__(self, checkpoint: str) -> None:
        super().__init__(PAUSED_EXIT_STATUS)
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"the job paused and saved {self.checkpoint}; resume with start_at='latest'"


class PeerFailed(RuntimeError):
    """Raised on the ranks that stop because another rank failed (which reports the cause)."""
