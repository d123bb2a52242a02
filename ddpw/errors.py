"""The two errors that ddpw raises on purpose.

:class:`ConfigError` means the job was never started: something in the configuration, the machine
or the checkpoints on disk does not fit. :class:`WorkerError` means the job started and a rank
failed; it carries that rank's number and traceback.
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
        self.rank = rank
        self.status = status
        self.details = details
