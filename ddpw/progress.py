"""What a :class:`~ddpw.trainer.Trainer` shows as it goes, on the main process when
``PlatformConfig.verbose``: a progress bar per epoch and per evaluation, and its ``[ddpw]``
lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .job import JobMode

if TYPE_CHECKING:
    import torch

    from .job import JobConfig
    from .platform import PlatformConfig


class Bar(tqdm):
    """A tqdm bar without tqdm's monitor thread: a thread that starts or ends while a DataLoader
    forks its workers can leave a worker hung for good in CPython's fork (seen with Python
    3.11: the child waits for the thread-state lock that the other thread held)."""

    monitor_interval = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.since = (time.perf_counter(), kwargs.get("initial", 0))

    def note(self, batch: int, loss: torch.Tensor, samples_per_batch: int) -> None:
        """At every tenth ``batch``, show the loss and the samples per second (of
        ``samples_per_batch`` each) since the bar began."""
        if not self.disable and batch % 10 == 0:
            started, first = self.since
            rate = (batch - first) * samples_per_batch / (time.perf_counter() - started)
            self.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")


def bar(loader: Iterable[Any], description: str, shown: bool, initial: int = 0) -> Bar:
    """A bar over ``loader``'s batches, from batch ``initial`` on (a resumed epoch's); hidden
    unless ``shown``. It asks nothing of ``len(loader)``: a stream has none, and its bar counts
    batches without a total."""
    return Bar(loader, desc=description, disable=not shown, leave=False, dynamic_ncols=True,
               unit="batch", initial=initial)


def starting(j_config: JobConfig, p_config: PlatformConfig, resume_from: str | None) -> str:
    """The line that a job begins with: the platform, and what it does from where."""
    j = j_config
    source = f"checkpoint {resume_from}" if resume_from else "the model"
    what = (f"evaluate {source}" if j.job_type is JobMode.EVALUATE else
            f"train from {source if resume_from else 'scratch'} to epoch {j.epochs}, save "
            f"every {j.save_every} to {j.checkpoint_path}")
    return f"[ddpw] {p_config.summary()}; {j.job_type.name}: {what}"


def epoch_metrics(metrics: dict[str, Any]) -> str:
    """The line of an epoch's metrics (floats to 4 significant digits)."""
    return "[ddpw] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in metrics.items())
