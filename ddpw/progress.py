"""ddpw's progress bars: one per epoch and per evaluation, on the main process when
``PlatformConfig.verbose``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


class Bar(tqdm):
    """A tqdm bar without tqdm's monitor thread: a thread that starts or ends while a DataLoader
    forks its workers can leave a worker hung for good in CPython's fork (seen with Python
    3.11: the child waits for the thread-state lock that the other thread held)."""

    monitor_interval = 0


def bar(loader: Iterable[Any], description: str, shown: bool, initial: int = 0) -> Bar:
    """A bar over ``loader``'s batches, from batch ``initial`` on (a resumed epoch's); hidden
    unless ``shown``. It asks nothing of ``len(loader)``: a stream has none, and its bar counts
    batches without a total."""
    return Bar(loader, desc=description, disable=not shown, leave=False, dynamic_ncols=True,
               unit="batch", initial=initial)
