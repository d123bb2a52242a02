"""One job of the checkpoint bench (``checkpoint.py``): a ddpw Trainer on 1 or 2 CPU processes
that measures, inside the running job, ddpw's checkpoints beside ``torch.save``, ``torch.load``
and Accelerate's ``save_state`` and ``load_state``, and writes what it measured as JSON::

    python scripts/bench/checkpoint_job.py --mode sync --procs 2 --params 10 --repeats 3 \\
        --folder DIR --out result.json

The model is :func:`make_model`'s stack of square linear layers with Adam, trained for a few
steps first (so that Adam's state exists); every checkpoint holds the model and the optimiser.
Every variant writes into its own subfolder of ``--folder`` (one file system); a save's earlier
output is deleted before it, untimed, and ``os.sync()`` runs before every timed action, so that
no earlier run's dirty pages are written back during it. Loads read from the page cache: the
files were just written, and a warm-up round reads them once more. The variants take turns, a
warm-up round first.

``--mode sync`` (``JobConfig.async_checkpoint=False``), each variant timed on rank 0 from a
barrier before it to a barrier after it, so every rank's part is in the time:

- saves: ddpw's ``save_checkpoint()`` (each rank writes, hashes and flushes its share; rank 0
  publishes), ``torch.save`` of the same state on rank 0 (the others wait at the barrier, as
  users write it) with and without an fsync of its file and folders (ddpw's durability), and
  ``accelerator.save_state`` (every rank; it flushes nothing);
- loads: ddpw's ``restore_checkpoint()`` (each rank hashes a share of the files, then loads
  everything), ddpw's files read without any hash check, ``torch.load`` + ``load_state_dict``
  on every rank, and ``accelerator.load_state``.

``--mode async`` (``JobConfig.async_checkpoint=True``):

- host memory: ``VmRSS`` before the first save, then the peak (``VmHWM``, reset just before)
  once that save is published: the save's extra memory, buffers included;
- the time ``save_checkpoint()`` takes to return on each rank (the slowest rank's, as DDP's
  next all-reduce waits for it), and then how long until the checkpoint is published, beside
  ``torch.save`` on rank 0 (with and without fsync) and plain copies of the same tensors into
  buffers allocated beforehand: every rank copying the whole state, and each its own share
  (as :func:`ddpw.checkpoint.layout.assign` deals it out);
- steps per second of the Trainer's own loop (``train_epoch``) over ``4 * every`` steps with no
  checkpoint, with ddpw's ``save_checkpoint()`` at steps ``every``, ``2 * every`` and
  ``3 * every`` (waited for at the end, within the time), and with ``torch.save`` on rank 0 and
  a barrier at the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch.utils.data import TensorDataset

from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Trainer, Wrapper

#: Features of the model's layers (and of the inputs).
WIDTH = 2048
#: Samples per batch per process: small, so that a step is short beside a save.
BATCH_SIZE = 8
SEED = 1889

# The variants' names, which checkpoint.py turns into rows.
DDPW_SAVE = "ddpw save_checkpoint (sync)"
DDPW_RESTORE = "ddpw restore_checkpoint (hash-checked)"
DDPW_READ = "ddpw files read, no hash check"
DDPW_ASYNC = "ddpw save_checkpoint (async): blocked"
TORCH_SAVE = "torch.save"
TORCH_SAVE_FSYNC = "torch.save + fsync"
TORCH_LOAD = "torch.load + load_state_dict"
ACCELERATE_SAVE = "accelerator.save_state"
ACCELERATE_LOAD = "accelerator.load_state"
COPY_FULL = "copy into buffers: full state"
COPY_SHARE = "copy into buffers: own share"
NO_CHECKPOINTS = "no checkpoints"
DDPW_EVERY = "ddpw save_checkpoint (async)"
TORCH_EVERY = "torch.save on rank 0"


def make_model(params_m: int) -> torch.nn.Module:
    """A stack of ``WIDTH x WIDTH`` linear layers and a narrower last one, ``params_m`` million
    parameters in all (to 0.1%), the same weights in every process."""
    total, square = round(params_m * 1e6), WIDTH * WIDTH + WIDTH
    layers = max(1, total // square)
    last = (total - layers * square) // (WIDTH + 1)
    widths = [WIDTH] * layers + ([last] if last else [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, out) for out in widths])


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-5)


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (``VmRSS``) and its peak (``VmHWM``), in MiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024
            for key in ("VmRSS", "VmHWM")}


def reset_peak_memory() -> None:
    """Start ``VmHWM`` again from the current ``VmRSS`` (Linux: ``clear_refs`` value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def fsynced(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CheckpointBench(Trainer):
    """A Trainer whose :meth:`train` runs the bench instead of the usual epochs: see the
    module's description."""

    def __init__(self, j_config: JobConfig, mode: str, repeats: int, every: int,
                 scratch: str, out: str) -> None:
        super().__init__(j_config)
        self.mode, self.repeats, self.every = mode, repeats, every
        self.scratch, self.out = Path(scratch), Path(out)
        #: What train_step saves every ``every`` steps: ``None``, ``"ddpw"`` or ``"torch"``.
        self.saving: str | None = None
        self.loop_blocked: list[float] = []

    # --- the training step and loop --------------------------------------------------------------

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # The batches done so far are a step boundary after an optimiser step: where a user's
        # loop would save.
        if self.saving and self.batch and self.batch % self.every == 0:
            started = time.perf_counter()
            if self.saving == "ddpw":
                self.save_checkpoint()
            else:
                self._torch_save(self.scratch / "torch-loop", fsync=False)
                self.barrier()
            self.loop_blocked.append(time.perf_counter() - started)
        inputs, targets = batch
        return F.mse_loss(self.model(inputs), targets)

    def epoch_of_training(self) -> None:
        """One epoch of the Trainer's own loop, then its between-epoch pause vote, as
        :meth:`Trainer.train` does them."""
        self.epoch = self.epochs_done + 1
        self.train_epoch()
        self.epochs_done, self.batch = self.epoch, 0
        self._ddpw.vote.agreed(self.world_size)

    def train(self) -> dict[str, float]:
        self.epoch_of_training()  # fills Adam's state, warms the loop up
        found: dict[str, Any] = {"procs": self.world_size, "mode": self.mode,
                                 "params": sum(p.numel() for p in self.model.parameters()),
                                 "threads": torch.get_num_threads()}
        items, owners = self._state_tensors()
        sizes = [t.numel() * t.element_size() for t in items]
        found["state_bytes"] = sum(sizes)
        found["share_bytes"] = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r)
                                for r in range(self.world_size)]
        if self.mode == "sync":
            found |= self._bench_sync()
        else:
            found |= self._bench_async(items, owners)
        if self.global_rank == 0:
            self.out.write_text(json.dumps(found))
        return {}

    # --- helpers ---------------------------------------------------------------------------------

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def _settled(self) -> None:
        """No dirty pages of an earlier run left to write back, and every rank here."""
        if self.global_rank == 0:
            os.sync()
        self.barrier()

    def timed(self, action: Callable[[], Any]) -> float:
        """Seconds from a barrier before ``action`` to a barrier after it, on rank 0."""
        self._settled()
        started = time.perf_counter()
        action()
        self.barrier()
        return time.perf_counter() - started

    def _state(self) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        return {"model": model.state_dict(), "optimiser": self.optimiser.state_dict()}

    def _torch_save(self, folder: Path, fsync: bool) -> None:
        """``torch.save`` of the model and optimiser on rank 0 (the others go on)."""
        if self.global_rank != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self._state(), folder / "state.pt")
        if fsync:
            fsynced(folder / "state.pt", folder, folder.parent)

    def _torch_load(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])

    def _ddpw_read(self, folder: Path) -> None:
        from ddpw.checkpoint import read_model, read_part

        read_model(folder, self.accelerator.unwrap_model(self.model), self.device)
        self.optimiser.load_state_dict(read_part(folder, "optimiser", self.device))

    def _clear(self, *paths: Path | None) -> None:
        """Delete earlier outputs (rank 0), untimed."""
        if self.global_rank == 0:
            for path in paths:
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
        self.barrier()

    def _state_tensors(self) -> tuple[list[torch.Tensor], list[int]]:
        """The tensors a checkpoint holds and the rank that writes each, as ddpw deals them."""
        from ddpw.checkpoint.layout import assign
        from ddpw.checkpoint.slices import model_tensors
        from ddpw.checkpoint.tensors import split

        tensors, _ = model_tensors(self.accelerator.unwrap_model(self.model))
        found: dict[str, torch.Tensor] = {}
        split(self.optimiser.state_dict(), found)
        items = [*tensors.values(), *found.values()]
        owners = assign([t.numel() * t.element_size() for t in items], self.world_size)
        return items, owners

    def _save_ddpw(self, number: int) -> Path:
        # A position of its own for every save, so that none replaces an earlier one.
        self.batch = 1000 + number
        folder = self.save_checkpoint()
        self.batch = 0
        return folder

    def _take_turns(self, actions: dict[str, Callable[[int], float]]) -> dict[str, list[float]]:
        """A warm-up round, then ``repeats`` rounds of every action in turn; each returns its
        seconds."""
        runs: dict[str, list[float]] = {name: [] for name in actions}
        for round_ in range(self.repeats + 1):
            for name, action in actions.items():
                seconds = action(round_)
                if round_:
                    runs[name].append(seconds)
        return runs

    # --- sync: saves and loads -------------------------------------------------------------------

    def _bench_sync(self) -> dict[str, Any]:
        accelerate_dir = self.scratch / "accelerate"
        torch_dir = self.scratch / "torch"
        last: dict[str, Path | None] = {"ddpw": None}

        def ddpw_save(number: int) -> float:
            self._clear(last["ddpw"])
            folder: list[Path] = []
            seconds = self.timed(lambda: folder.append(self._save_ddpw(number)))
            last["ddpw"] = folder[0]
            return seconds

        def torch_save(fsync: bool) -> Callable[[int], float]:
            def save(number: int) -> float:
                self._clear(torch_dir)
                return self.timed(lambda: self._torch_save(torch_dir, fsync))
            return save

        def accelerate_save(number: int) -> float:
            self._clear(accelerate_dir)
            return self.timed(lambda: self.accelerator.save_state(str(accelerate_dir)))

        runs = self._take_turns({DDPW_SAVE: ddpw_save, TORCH_SAVE_FSYNC: torch_save(True),
                                 TORCH_SAVE: torch_save(False), ACCELERATE_SAVE: accelerate_save})
        ddpw_dir = last["ddpw"]
        assert ddpw_dir is not None
        sizes = {DDPW_SAVE: folder_bytes(ddpw_dir), TORCH_SAVE: folder_bytes(torch_dir),
                 ACCELERATE_SAVE: folder_bytes(accelerate_dir)}
        files = sorted(p.name for p in ddpw_dir.iterdir())
        runs |= self._take_turns({
            DDPW_RESTORE: lambda _: self.timed(lambda: self.restore_checkpoint(ddpw_dir.name)),
            DDPW_READ: lambda _: self.timed(lambda: self._ddpw_read(ddpw_dir)),
            TORCH_LOAD: lambda _: self.timed(lambda: self._torch_load(torch_dir)),
            ACCELERATE_LOAD: lambda _: self.timed(
                lambda: self.accelerator.load_state(str(accelerate_dir)))})
        return {"runs": runs, "bytes": sizes, "ddpw_files": files}

    # --- async: memory, blocked time, copies, steps/s ------------------------------------------

    def _bench_async(self, items: list[torch.Tensor], owners: list[int]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        steps = len(self.train_loader)

        def train_and_wait() -> None:
            # The last save's background work is waited for within the time.
            self.epoch_of_training()
            self.wait_for_checkpoint()

        # Memory first: the peak of an epoch without checkpoints, then of one with a checkpoint
        # every `every` steps, whose first save makes the host buffers that later saves reuse.
        # Only whole epochs' peaks compare: a step's temporaries (Adam's) come and go, and the
        # buffers may take memory that they had freed, which the next step then asks for again.
        peaks: dict[str, float] = {}
        for name, saving in ((NO_CHECKPOINTS, None), (DDPW_EVERY, "ddpw")):
            self.saving, self.loop_blocked = saving, []
            self._settled()
            before = memory_mb()["VmRSS"]
            reset_peak_memory()
            train_and_wait()
            peaks[name] = memory_mb()["VmHWM"]
        self.saving = None
        found["memory_mb"] = gather_object([{
            "peak_without": peaks[NO_CHECKPOINTS], "peak_with": peaks[DDPW_EVERY],
            "rss_before_saves": before, "rss_after_saves": memory_mb()["VmRSS"]}])
        found["first_save_blocked_s"] = max(gather_object([self.loop_blocked[0]]))
        self._clear_checkpoints()

        torch_dir = self.scratch / "torch"
        # Buffers made beforehand, as ddpw keeps its own from one save to the next.
        full = [(t, torch.empty(t.shape, dtype=t.dtype)) for t in items]
        share = [pair for pair, owner in zip(full, owners, strict=True)
                 if owner == self.global_rank]
        background: list[float] = []

        def per_rank(action: Callable[[], Any]) -> float:
            """The slowest rank's seconds from a common barrier until ``action`` returned."""
            self._settled()
            started = time.perf_counter()
            action()
            return max(gather_object([time.perf_counter() - started]))

        def ddpw_async(number: int) -> float:
            folder: list[Path] = []
            self._settled()
            started = time.perf_counter()
            folder.append(self._save_ddpw(number))
            blocked = time.perf_counter() - started
            self.wait_for_checkpoint()
            published = time.perf_counter() - started
            blocked, published = (max(v) for v in zip(*gather_object([(blocked, published)]),
                                                       strict=True))
            if number:
                background.append(published)
            self._clear(folder[0])
            return blocked

        def torch_save(fsync: bool) -> Callable[[int], float]:
            def save(number: int) -> float:
                self._clear(torch_dir)
                return self.timed(lambda: self._torch_save(torch_dir, fsync))
            return save

        def copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for source, target in pairs:
                target.copy_(source)

        found["runs"] = self._take_turns({
            DDPW_ASYNC: ddpw_async, TORCH_SAVE: torch_save(False),
            TORCH_SAVE_FSYNC: torch_save(True),
            COPY_FULL: lambda _: per_rank(lambda: copy_all(full)),
            COPY_SHARE: lambda _: per_rank(lambda: copy_all(share))})
        found["published_s"] = background
        full.clear()  # the buffers' memory back before the training loop
        share.clear()

        # Steps per second, taking turns; the memory's epochs were the warm-up.
        rates: dict[str, list[float]] = {NO_CHECKPOINTS: [], DDPW_EVERY: [], TORCH_EVERY: []}
        blocked: dict[str, list[float]] = {DDPW_EVERY: [], TORCH_EVERY: []}
        for _ in range(self.repeats):
            for name, saving in ((NO_CHECKPOINTS, None), (DDPW_EVERY, "ddpw"),
                                 (TORCH_EVERY, "torch")):
                self._clear_checkpoints()
                self.saving, self.loop_blocked = saving, []
                seconds = self.timed(train_and_wait)
                self.saving = None
                rates[name].append(steps / seconds)
                if name in blocked:  # each save's slowest rank
                    blocked[name] += [max(v) for v in zip(*gather_object([self.loop_blocked]),
                                                          strict=True)]
        found |= {"rates": rates, "loop_blocked_s": blocked, "steps_per_epoch": steps,
                  "every": self.every}
        return found

    def _clear_checkpoints(self) -> None:
        """Delete every checkpoint so far (rank 0), untimed, so that no later save prunes one
        of them in its time."""
        self._clear(*(p for p in Path(self.j_config.checkpoint_path).iterdir() if p.is_dir())
                    if self.global_rank == 0 else ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sync", "async"), required=True)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="compute threads per process")
    parser.add_argument("--params", type=int, default=10, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=10,
                        help="async: steps between checkpoints in the steps/s measurement")
    parser.add_argument("--folder", type=Path, required=True, help="where checkpoints go")
    parser.add_argument("--out", type=Path, required=True, help="the JSON written")
    args = parser.parse_args()
    # Sync: a couple of steps fill Adam's state. Async: epochs of 4 * every steps.
    steps = 2 if args.mode == "sync" else 4 * args.every
    samples = steps * BATCH_SIZE * args.procs
    generator = torch.Generator().manual_seed(SEED)
    model = make_model(args.params)
    data = TensorDataset(torch.randn(samples, WIDTH, generator=generator),
                         torch.randn(samples, model[-1].out_features, generator=generator))
    a_config = ArtefactsConfig(train_set=data, batch_size=BATCH_SIZE, model=model,
                               optimiser_loader=adam)
    j_config = JobConfig(epochs=1, save_every=0, keep_last=2,
                         checkpoint_path=str(args.folder / "ddpw"),
                         training_logs_path=str(args.folder / "logs"),
                         async_checkpoint=args.mode == "async")
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=args.procs,
                              cpus_per_task=args.threads, seed=SEED, verbose=False)
    trainer = CheckpointBench(j_config, args.mode, args.repeats, args.every, str(args.folder),
                              str(args.out))
    Wrapper(p_config, a_config).start(trainer)


if __name__ == "__main__":
    main()
