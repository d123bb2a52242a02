"""Trainers for the tests of asynchronous checkpoints (tests/test_checkpoint_async.py).

Like :mod:`jobs`, an importable module, so that the job's processes import them by reference.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import safetensors.torch
from jobs import BlobTrainer, ErrorNotingTrainer

from ddpw import JobConfig

#: How long a trainer waits for a signal that a test's fault hook sends: a bound for a busy
#: machine, not a speed.
SIGNAL_BOUND_S = 120


class PidTrainer(BlobTrainer):
    """Writes its pid to ``{folder}/ready-{rank}`` once set up (a checkpoint restored), for
    :func:`jobs.wait_for_ranks`, so that a test can kill one rank.

    With ``notify`` (a UDP port on the loopback), rank 0 sends the name of each checkpoint
    whose save has returned, its write now under way in the background: a test waits for it
    without polling the disk.
    """

    def __init__(self, j_config: JobConfig, folder: str, notify: int | None = None) -> None:
        super().__init__(j_config)
        self.folder, self.notify = folder, notify

    def setup(self, accelerator, p_config, a_config) -> None:
        super().setup(accelerator, p_config, a_config)
        ready = Path(self.folder) / f"ready-{self.global_rank}"
        partial = ready.with_name(f".{ready.name}")
        partial.write_text(str(os.getpid()))
        partial.replace(ready)  # never read half written

    def save_checkpoint(self) -> Path:
        folder = super().save_checkpoint()
        if self.notify is not None and self.global_rank == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as note:
                note.sendto(folder.name.encode(), ("127.0.0.1", self.notify))
        return folder


class SignalNotingTrainer(BlobTrainer):
    """Waits, at one point of the job, for the ``SIGTERM`` that the fault hook
    (``FILENAME:sigterm=PID``) sends through the caller while the epoch-end checkpoint of epoch
    ``epoch`` is written in the background:

    - ``where="boundary"``: right after that checkpoint's save returns, before the epoch's end
      asks whether to pause, so that the pause comes there and its checkpoint is that one;
    - ``where="mid-epoch"``: in the first step of the next epoch, so that the pause comes a few
      steps into it and writes a checkpoint of its own.

    ``where=None`` waits for nothing (the resumed run). ddpw's handler of the signal stays in
    place; this trainer's only notes, before it, that the signal came.
    """

    def __init__(self, j_config: JobConfig, epoch: int, where: str | None) -> None:
        super().__init__(j_config)
        self.signal_epoch, self.where = epoch, where
        self.signalled = False

    def setup(self, accelerator, p_config, a_config) -> None:
        super().setup(accelerator, p_config, a_config)
        previous = signal.getsignal(signal.SIGTERM)

        def note(signum: int, frame: Any) -> None:
            self.signalled = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, note)

    def wait_for_signal(self) -> None:
        deadline = time.monotonic() + SIGNAL_BOUND_S
        while not self.signalled:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {self.global_rank}: no SIGTERM came during the "
                                   f"checkpoint of epoch {self.signal_epoch}")
            time.sleep(0.01)

    def save_checkpoint(self) -> Path:
        folder = super().save_checkpoint()
        if self.where == "boundary" and (self.epochs_done, self.batch) == (self.signal_epoch, 0):
            self.wait_for_signal()
        return folder

    def train_step(self, batch):
        if self.where == "mid-epoch" and (self.epoch, self.batch) == (self.signal_epoch + 1, 0):
            self.wait_for_signal()
        return super().train_step(batch)


class WaitingTrainer(ErrorNotingTrainer):
    """Saves at batch ``at`` of epoch 1 and then waits for that save
    (:meth:`~ddpw.trainer.Trainer.wait_for_checkpoint`), noting in
    ``{training_logs_path}/rank-R.steps`` which of the two returned and which raised what."""

    def __init__(self, j_config: JobConfig, at: int) -> None:
        super().__init__(j_config)
        self.at = at

    def note(self, line: str) -> None:
        folder = Path(self.j_config.training_logs_path)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank-{self.global_rank}.steps", "a") as f:
            f.write(line + "\n")

    def train_step(self, batch):
        if (self.epoch, self.batch) == (1, self.at):
            for step in (self.save_checkpoint, self.wait_for_checkpoint):
                try:
                    step()
                except Exception as error:
                    self.note(f"{step.__name__} raised {type(error).__name__}: {error}")
                    raise
                self.note(f"{step.__name__} returned")
        return super().train_step(batch)


class TwoSavesTrainer(BlobTrainer):
    """Saves at batches ``first`` and ``first + 1`` of epoch 1, one step apart, so that the
    second save comes while the first may still be written in the background.

    Rank 0 writes ``{training_logs_path}/saved-B.safetensors``: the model's and the optimiser's
    tensors as the save at batch ``B`` saw them (what its checkpoint must hold, though the
    next step changes them), and ``{training_logs_path}/after-second-save``: which
    checkpoints were published when the second save returned.
    """

    def __init__(self, j_config: JobConfig, first: int) -> None:
        super().__init__(j_config)
        self.first = first

    def train_step(self, batch):
        if self.epoch == 1 and self.batch in (self.first, self.first + 1):
            from ddpw import checkpoint as ckpt

            logs = Path(self.j_config.training_logs_path)
            if self.global_rank == 0:
                logs.mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_file(self.state_tensors(),
                                            str(logs / f"saved-{self.batch}.safetensors"))
            self.save_checkpoint()
            if self.global_rank == 0 and self.batch == self.first + 1:
                published = ckpt.available(self.j_config.checkpoint_path,
                                           self.j_config.checkpoint_name_prefix)
                (logs / "after-second-save").write_text("\n".join(published))
        return super().train_step(batch)

    def state_tensors(self):
        """The model's and the optimiser's tensors, named as :func:`jobs.final_files` names
        them."""
        from ddpw.checkpoint import split

        model = self.accelerator.unwrap_model(self.model)
        found = {f"model/{key}": t.detach().clone() for key, t in model.state_dict().items()}
        optimiser: dict[str, Any] = {}
        split(self.optimiser.state_dict(), optimiser)
        return found | {f"optimiser/{key}": t.detach().clone().contiguous()
                        for key, t in optimiser.items()}
