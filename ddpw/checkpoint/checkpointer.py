"""The checkpoint transaction as one object, :class:`Checkpointer`: how the ranks of a job write
a checkpoint together, in the background, and how each rank reads one back, verified.

**Saving.** :meth:`Checkpointer.save` deals the tensors of the model, optimiser, scheduler and
scaler out to the ranks (:func:`~ddpw.checkpoint.slices.share`): whole tensors (DDP) balanced
by bytes, and each rank's own rows of the tensors sliced across the ranks (FSDP). Each rank
copies its share into host buffers kept from one save to the next (pinned memory on CUDA;
freed by :meth:`Checkpointer.close`). Then the save returns and training goes on, while a
thread of the checkpointer's own writes the checkpoint in three steps, each ending with every
rank learning whether any rank failed:

1. the main rank cleans up after interrupted writes and makes the staging folder;
2. every rank writes, hashes and flushes its share and its own part (its RNG states and running
   sums), and the main rank the parts' structure, the index of the shares and the position;
3. the main rank merges the ranks' slices into the manifest, publishes the checkpoint
   (:func:`~ddpw.checkpoint.manifest.publish`), notes it in the SLURM job's record
   (:data:`ddpw.environment.CHECKPOINT_RECORD`) and prunes old ones.

At most one save is in flight: the next one, :meth:`Checkpointer.wait` and
:meth:`Checkpointer.close` wait for it and raise its error. A save that fails in the background
also calls ``on_failure`` (a Trainer's pause request), so that every rank stops at the same step
boundary and raises the error there. Without ``asynchronous``, a save writes in the calling
thread from the tensors' own memory and returns once the checkpoint is published.

**Loading.** :meth:`Checkpointer.restore` maps every file it needs into memory once; each rank
hashes a share of the files (about the same bytes on every rank), the ranks agree that no file
is damaged, and only then is anything put into the model: each rank reads only the rows that
it holds of a sharded model (:mod:`~ddpw.checkpoint.reading`), whichever world size and
strategy wrote the checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import environment, jobfolder
from ..errors import ConfigError, PeerFailed
from ..network import gloo_group
from .hashing import new_hasher, write_json
from .layout import assign, index, index_file
from .manifest import check, damage, hash_of, publish
from .names import Position, prune, staging_path, tidy
from .reading import catalogue, load_model, load_part
from .slices import merge, model_tensors, share
from .state import FILE, TrainingState
from .tensors import MappedFile, join, split, write_tensors


@dataclass
class Contents:
    """What a checkpoint holds, as :meth:`ddpw.machinery.Machinery.contents` makes it for
    :meth:`ddpw.trainer.Trainer.save_checkpoint`."""

    #: The unwrapped model (no ``module.`` prefix).
    model: torch.nn.Module
    #: The state dicts that every rank holds alike: ``optimiser``, ``scheduler``, ``scaler``.
    parts: dict[str, Any]
    #: The data position and metrics, written by the main rank as ``state.json``.
    state: TrainingState
    #: This rank's own part (``rank-{r}``): its RNG states and running sums.
    own: dict[str, Any]
    #: Fields the manifest records (platform, mixed precision).
    manifest: dict[str, Any]


@dataclass
class Restored:
    """What :meth:`Checkpointer.restore` read besides the model and the shared parts."""

    #: The ``state.json`` part.
    state: TrainingState
    #: This rank's own part, or ``None`` when the checkpoint was written by another world size.
    own: dict[str, Any] | None
    #: Without ``own``: every rank's own part, for what adds up across ranks (running sums).
    every_own: list[dict[str, Any]] = field(default_factory=list)


def _blocking(method: Callable[..., Any]) -> Callable[..., Any]:
    """Add the seconds that a :class:`Checkpointer`'s ``method`` holds its caller to its
    ``blocked_s`` (once, when it calls another such method)."""
    @functools.wraps(method)
    def timed(self: Checkpointer, *args: Any, **kwargs: Any) -> Any:
        started, self._held = time.monotonic(), self._held + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._held -= 1
            if not self._held:
                self.blocked_s += time.monotonic() - started
    return timed


class Checkpointer:
    """One rank's side of a job's checkpoints in ``root``, named ``{prefix}_...``.

    :param keep_last: keep the ``k`` checkpoints written last (``0``: all).
    :param asynchronous: write in the background (see the module's description).
    :param rank: this process's rank; ``world_size``: the number of processes.
    :param device: where the model lives; on CUDA the host buffers are pinned.
    :param on_failure: called in the background thread when a save failed.
    """

    def __init__(self, root: Path, prefix: str, keep_last: int, asynchronous: bool, rank: int,
                 world_size: int, device: torch.device,
                 on_failure: Callable[[], None] = lambda: None) -> None:
        self.root, self.prefix, self.keep_last = Path(root), prefix, keep_last
        self.asynchronous, self.rank, self.world_size = asynchronous, rank, world_size
        self.device, self.on_failure = device, on_failure
        self._group: Any = None
        self._thread: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        #: The seconds that :meth:`save` and :meth:`wait` (and so :meth:`close`) held the caller.
        self.blocked_s, self._held = 0.0, 0

    # --- set-up and end --------------------------------------------------------------------------

    def open(self, writes: bool) -> None:
        """Make the checkpoints' own process group and, for an asynchronous job, its thread;
        every rank must call it at the same point, before training.

        Both are made here, once: a thread started or ended while a DataLoader forks its
        workers can leave a worker hung (see :class:`ddpw.progress.Bar`).

        :param writes: whether the job will save; then every rank must see the folder.
        :raises ConfigError: when some ranks do not see what the main rank writes in ``root``.
        """
        if self.world_size > 1:
            self._group = gloo_group(unlimited=True)
            if writes:
                self._check_shared()
        if self.asynchronous and writes:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="ddpw-checkpoint")
            self._thread.submit(lambda: None).result()

    def close(self, raising: bool = True) -> None:
        """Wait for the save in flight, end the thread and free the host buffers (in place,
        inside the caller's own launch, the process goes on after the job).

        :param raising: raise the save's error; otherwise (when the job is already failing)
            only print it, so that it does not hide the job's own error.
        """
        try:
            self.wait()
        except Exception as error:
            if raising:
                raise
            print(f"[ddpw] rank {self.rank}: {type(error).__name__}: {error}", file=sys.stderr,
                  flush=True)
        finally:
            if self._thread is not None:
                self._thread.shutdown()
                self._thread = None
            self._buffers = {}

    @_blocking
    def wait(self) -> None:
        """Wait until the save in flight, if any, is published; raise its error if it failed."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def _check_shared(self) -> None:
        """Check that every rank sees the file that the main rank writes into ``root``."""
        probe = None
        if self.rank == 0:
            probe = self.root / f".ddpw-shared-{secrets.token_hex(8)}"
        name = self._agree(None, lambda: _write_probe(probe), main_only=True)[0]
        seen = (self.root / name).is_file()
        views = self._gather((seen, socket.gethostname()))
        if self.rank == 0:
            (self.root / name).unlink(missing_ok=True)
        blind = [f"rank {r} on {host}" for r, (saw, host) in enumerate(views) if not saw]
        if blind:
            raise ConfigError(
                f"JobConfig.checkpoint_path={str(self.root)!r} is not one folder for every "
                f"rank: {', '.join(blind)} cannot see what rank 0 (on {views[0][1]}) writes "
                f"there. Each rank writes a share of every checkpoint, so give a path on a file "
                f"system that every node mounts (not a node-local disk such as /tmp).")

    # --- saving ----------------------------------------------------------------------------------

    @_blocking
    def save(self, position: Position, contents: Contents,
             protect: tuple[str | None, ...] = ()) -> Path:
        """Write the checkpoint of ``position``; every rank must call it at the same point.

        Asynchronously, it returns once this rank's share is copied; otherwise once the
        checkpoint is published. A checkpoint of the same position is replaced.

        :param protect: checkpoints that pruning must keep (the one the job resumed from).
        :returns: the checkpoint's folder.
        :raises PeerFailed: on the ranks whose own part went well when another rank's failed,
            with that rank's error; the failed rank raises its own (here, or from the
            background at :meth:`wait`).
        """
        self.wait()
        folder = self.root / position.name(self.prefix)
        files, index_files, sliced = self._share(contents)
        copied = torch.cuda.Event() if self._thread is not None and self.device.type == "cuda" \
            else None
        if copied is not None:
            copied.record()
        manifest = {"prefix": self.prefix, "epochs_done": position.epochs,
                    "batches": position.batches, "world_size": self.world_size,
                    "shares": self.world_size, **contents.manifest}

        def write() -> None:
            if copied is not None:
                copied.synchronize()
            staging = staging_path(folder)
            self._agree(folder, lambda: self._begin(staging), main_only=True)
            written = self._agree(folder, lambda: (_write_files(staging, files, index_files),
                                                   sliced))
            digests = {name: digest for share, _ in written for name, digest in share.items()}
            # Each rank's slices, in the manifest ("sliced"): where a loader finds its rows.
            merged = merge([slices for _, slices in written])
            self._agree(folder, lambda: self._publish(
                staging, folder, digests, manifest | ({"sliced": merged} if merged else {}),
                protect), main_only=True)

        if self._thread is None:
            write()
        else:
            self._in_flight = self._thread.submit(self._background, write)
        return folder

    def _background(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException:
            self.on_failure()
            raise

    def _share(self, contents: Contents
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
        """This rank's files of the checkpoint, as what to write into each (tensors staged in
        host buffers when asynchronous), the main rank's index files, and this rank's slices
        of the sliced tensors (:mod:`~ddpw.checkpoint.slices`)."""
        shared: list[tuple[str, str, torch.Tensor]] = []
        structures: dict[str, Any] = {}
        tensors, tied = model_tensors(contents.model)
        shared += [("model", key, t) for key, t in tensors.items()]
        for part, obj in contents.parts.items():
            found: dict[str, torch.Tensor] = {}
            structures[part] = split(obj, found)
            shared += [(part, key, t) for key, t in found.items()]
        mine = share(shared, self.rank, self.world_size)
        # "format": what Hugging Face's loaders require of a model file's metadata.
        metadata = {"format": "pt", **({"ddpw_aliases": json.dumps(tied)} if tied else {})}
        files: dict[str, Any] = {
            name: ({key: self._staged(name, key, t) for key, t in held.items()},
                   metadata if part == "model" else None)
            for name, (part, held) in mine.files.items()}
        own: dict[str, torch.Tensor] = {}
        own_structure = split(contents.own, own)
        own = {key: t.detach().to("cpu", copy=True) for key, t in own.items()}
        if own:
            files[f"rank-{self.rank}.safetensors"] = (own, None)
        files[f"rank-{self.rank}.json"] = own_structure
        index_files: dict[str, Any] = {}
        if self.rank == 0:
            files |= {f"{part}.json": structure for part, structure in structures.items()}
            files[FILE] = json.loads(json.dumps(contents.state.to_dict()))  # as it is now
            if self.world_size > 1:
                index_files = {index_file(part): index(weight_map, mine.sizes[part])
                               for part, weight_map in mine.weight_maps.items()}
        return files, index_files, mine.sliced

    def _staged(self, name: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the writer reads it: copied into this key's host buffer when
        asynchronous (made on the first save, pinned on CUDA), else itself on the CPU."""
        tensor = tensor.detach()
        if self._thread is None:
            return tensor.to("cpu")
        buffer = self._buffers.get((name, key))
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype,
                                 pin_memory=self.device.type == "cuda")
            self._buffers[(name, key)] = buffer
        return buffer.copy_(tensor, non_blocking=True)

    def _begin(self, staging: Path) -> None:
        tidy(self.root, self.prefix)
        staging.mkdir(parents=True)

    def _publish(self, staging: Path, folder: Path, digests: dict[str, str],
                 manifest: dict[str, Any], protect: tuple[str | None, ...]) -> None:
        publish(staging, folder, digests, manifest)
        record = os.environ.get(environment.CHECKPOINT_RECORD)
        if record:
            jobfolder.note_checkpoint(Path(record), folder)
        if self.keep_last:
            prune(self.root, self.prefix, self.keep_last, protect=(*protect, folder.name))

    # --- agreeing --------------------------------------------------------------------------------

    def _gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank, through the checkpoints' own group."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self._group)
        return gathered

    def _agree(self, folder: Path | None, step: Callable[[], Any],
               main_only: bool = False) -> list[Any]:
        """Run ``step`` (on the main rank alone with ``main_only``) and learn whether it failed
        on any rank; return every rank's result. Every rank must call it at the same point.

        :raises PeerFailed: on a rank whose step went well when another's failed, naming each
            failed rank and its error (``[Errno 28] No space left on device: PATH``, say).
        """
        result, error = None, None
        if self.rank == 0 or not main_only:
            try:
                result = step()
            except Exception as caught:
                error = caught
        reason = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self._gather((reason, result))
        failed = [(rank, why) for rank, (why, _) in enumerate(gathered) if why is not None]
        if not failed:
            return [result for _, result in gathered]
        if self.rank == 0 and folder is not None:
            shutil.rmtree(staging_path(folder), ignore_errors=True)
        if error is not None:
            raise error
        what = f"checkpoint {folder} was not written" if folder else "the checkpoints' set-up"
        raise PeerFailed(f"{what}: " + "; ".join(f"rank {rank} failed with {why}"
                                                 for rank, why in failed))

    # --- loading ---------------------------------------------------------------------------------

    def restore(self, name: str, model: torch.nn.Module, loadables: dict[str, Any],
                batch_size: int, accumulation: int) -> Restored:
        """Load checkpoint ``name`` into ``model`` and each of ``loadables`` (``optimiser``,
        ``scheduler``, ``scaler``: objects with ``load_state_dict``) that it holds; every rank
        must call it at the same point.

        Each file is read once, mapped into memory; this rank checks the hashes of its share
        of the files while the others check theirs, and nothing is loaded until every rank has
        found its share intact.

        :param batch_size: this run's batch size; ``accumulation``: its gradient accumulation
            steps. With the world size, they say whether this rank's own part fits
            (:meth:`~ddpw.checkpoint.state.TrainingState.same_run`).
        :raises ConfigError: on every rank alike, naming a damaged file.
        """
        self.wait()
        folder = self.root / name
        mapped: dict[str, MappedFile] = {}
        state, mine, problem = None, False, None
        try:
            manifest = check(folder)
            files = sorted(manifest["files"])
            checkers = assign([manifest["files"][n]["bytes"] for n in files], self.world_size)
            for file, checker in zip(files, checkers, strict=True):
                if checker == self.rank:
                    problem = problem or self._check_file(folder, file, manifest, mapped)
            state = TrainingState.from_dict(self._map(folder, FILE, mapped).json())
            mine = (state.same_run(self.world_size, batch_size, accumulation)
                    and (folder / f"rank-{self.rank}.json").is_file())
        except ConfigError as error:
            problem = problem or str(error)
        # Every rank reaches this point, damage or not, and all raise the same error.
        problems = [p for p in self._gather(problem) if p is not None]
        if problems:
            raise ConfigError(problems[0])
        assert state is not None

        def mapping(name: str) -> MappedFile:
            return self._map(folder, name, mapped)

        load_model(model, folder, *catalogue(folder, manifest, "model", mapping), self.device)
        for part, target in loadables.items():
            if (folder / f"{part}.json").is_file():
                load_part(target, mapping(f"{part}.json").json(),
                          catalogue(folder, manifest, part, mapping)[0], self.device)
        if mine:
            return Restored(state, self._own(folder, self.rank, mapped))
        return Restored(state, None, [self._own(folder, rank, mapped)
                                      for rank in range(state.world_size)
                                      if (folder / f"rank-{rank}.json").is_file()])

    def _own(self, folder: Path, rank: int, mapped: dict[str, MappedFile]) -> dict[str, Any]:
        """Rank ``rank``'s own part (its RNG states live on the CPU: not moved to the device)."""
        tensors = (self._map(folder, f"rank-{rank}.safetensors", mapped).tensors()[0]
                   if (folder / f"rank-{rank}.safetensors").is_file() else {})
        return join(self._map(folder, f"rank-{rank}.json", mapped).json(), tensors)

    def _check_file(self, folder: Path, name: str, manifest: dict[str, Any],
                    mapped: dict[str, MappedFile]) -> str | None:
        hasher = new_hasher(hash_of(manifest))
        self._map(folder, name, mapped).hash_into(hasher)
        return damage(folder, name, manifest, hasher.hexdigest())

    @staticmethod
    def _map(folder: Path, name: str, mapped: dict[str, MappedFile]) -> MappedFile:
        if name not in mapped:
            mapped[name] = MappedFile(folder / name)
        return mapped[name]


def _write_probe(probe: Path | None) -> str:
    assert probe is not None  # the main rank's
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ddpw: every rank must see this file\n")
    return probe.name


def _write_files(staging: Path, files: dict[str, Any], index_files: dict[str, Any]
                 ) -> dict[str, str]:
    """Write this rank's ``files`` (safetensors from ``(tensors, metadata)``, JSON from anything
    else) and the index files into ``staging``; return each file's digest."""
    digests = {}
    for name, content in {**files, **index_files}.items():
        if name.endswith(".safetensors"):
            tensors, metadata = content
            digests[name] = write_tensors(staging / name, tensors, metadata)
        else:
            digests[name] = write_json(staging / name, content)
    return digests
