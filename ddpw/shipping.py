"""Pickling for another process: a job on its way to the workers, a result on its way back.

Objects travel with cloudpickle, so that classes and functions of the caller's ``__main__``
travel by value. torch pickles a tensor's data with the device it lives on, and unpickling puts
it back there: a job whose model was moved to ``cuda`` (or whose data set holds CUDA tensors)
would land on the same GPU in every worker, before Accelerate places each rank on its own
(one CUDA context and one model copy per rank on ``cuda:0``); a result holding CUDA tensors
could not be unpickled on a machine without a GPU at all, such as a SLURM login node. So
:func:`dumps` sends the data of every tensor that is not on the CPU as a CPU copy, and tells
what it moved. Parameters stay parameters, ``requires_grad`` and a tensor's attributes are kept
(torch's own pickling does that, only the data is replaced), an object reached twice (tied
weights) stays one object, and tensors that shared a device's memory (views) share the copy.
Tensors on the CPU pass through as torch pickles them, without a copy.

A Trainer that resumes from a checkpoint gets every tensor of its model's ``state_dict`` from
that checkpoint (a checkpoint that lacks one is refused before launch, and again as the ranks
load it), so :func:`ship` sends those tensors' storages without their data: each worker
allocates them, uninitialised, and the restore fills them in place. The model's other tensors
(non-persistent buffers, plain attributes) travel whole. A resumed 7B model then costs its
structure, not 28 GB of pickle, before the checkpoint is read.

Code travels with its file's name and source. cloudpickle sends the functions and classes of
the caller's ``__main__`` (and of a Jupyter cell) by value, and names the file of every code
object it sends ``<dynamic-code>``, so a traceback from the user's ``train_step`` would name no
file and show no line. ddpw's pickler sends code objects as :mod:`marshal` writes them (as a
``.pyc`` does: every field kept, the file name too) with the source lines of their file, which
the worker puts in :mod:`linecache`; a traceback on the worker, or a hang report
(:mod:`ddpw.hang`, through :mod:`traceback`), then names the script's path and line and shows
the line's text, as Python would in the caller, even where the file is not there (a Jupyter
cell, a node without the caller's file system) and whatever became of the file since. Code
without a file (``python -c``, standard input) travels the same way, with no source.

The alternative, multiprocessing's for its ``spawn`` start method, is to run the caller's
script again in each worker under another name (``__mp_main__``) so that its functions and
classes travel by reference. It runs the script's top level once more per rank (its data
loading, argument parsing, prints), it needs the ``if __name__ == "__main__":`` guard that a
ddpw script need not have today, and it cannot work for a Jupyter cell; so ddpw keeps by-value
shipping and only keeps the file name.
"""

from __future__ import annotations

import dataclasses
import io
import linecache
import marshal
import sys
import types
from typing import TYPE_CHECKING, Any

import cloudpickle
import torch
from torch.serialization import location_tag

from .errors import ConfigError
from .utils import is_trainer

if TYPE_CHECKING:
    from .jobfolder import Payload


@dataclasses.dataclass
class Moved:
    """What :func:`dumps` sent as CPU copies.

    :param storages: the number of tensor storages (one per block of device memory, however
        many tensors view it).
    :param nbytes: their size.
    :param devices: the devices they were on (``cuda:0``...), as torch would have restored them.
    """

    storages: int = 0
    nbytes: int = 0
    devices: set[str] = dataclasses.field(default_factory=set)

    def note(self, what: str) -> str:
        """One line that says what was moved, for the user who put ``what`` on a device."""
        devices = ", ".join(sorted(self.devices))
        return (f"[ddpw] {what} holds {self.storages} tensor storage(s) "
                f"({self.nbytes / 2**20:.1f} MiB) on {devices}: they travel to the worker "
                f"processes as CPU copies, so that none of them lands on {devices} in every "
                f"process; Accelerate puts a Trainer's model on each rank's own device (a "
                f"function moves its tensors to ddpw.world().device itself).")


def dumps(obj: Any, hollow: frozenset[int] = frozenset()) -> tuple[bytes, Moved]:
    """Pickle ``obj`` with cloudpickle, the data of its tensors that are not on the CPU as CPU
    copies; return the bytes and what was moved.

    :param hollow: the addresses (``data_ptr``) of storages to send without their data, as
        uninitialised storages of the same size on the CPU.
    """
    with io.BytesIO() as file:
        pickler = _CpuPickler(file, hollow)
        pickler.dump(obj)
        return file.getvalue(), pickler.moved


def ship(payload: Payload) -> bytes:
    """Pickle ``payload`` for the worker processes (:func:`dumps`), saying once what travels as
    CPU copies, unless ``PlatformConfig.verbose`` is false.

    :raises ConfigError: naming the first part of the payload that cannot be pickled.
    """
    try:
        data, moved = dumps(payload, restored_storages(payload))
    except Exception as error:
        culprit = _unpicklable_part(payload) or "the job"
        raise ConfigError(
            f"cannot send {culprit} to the worker processes: {type(error).__name__}: {error}. "
            f"Everything a job carries (target, arguments, datasets, model) is pickled with "
            f"cloudpickle; open files, locks, sockets, generators and live processes cannot be. "
            f"Create such objects inside the job instead.") from error
    if moved.storages and payload.p_config.verbose:
        print(moved.note("the job"), file=sys.stderr, flush=True)
    return data


def restored_storages(payload: Payload) -> frozenset[int]:
    """The addresses of the model's storages that the checkpoint a Trainer resumes from will
    fill (those of its ``state_dict``); none when it starts from the model as it is."""
    model = payload.a_config.model if payload.a_config is not None else None
    if payload.resume_from is None or model is None or not is_trainer(payload.target):
        return frozenset()
    storages = (t.untyped_storage() for t in model.state_dict(keep_vars=True).values())
    return frozenset(s.data_ptr() for s in storages if s.nbytes())


def _unpicklable_part(payload: Payload) -> str | None:
    target, parts = payload.target, []
    if is_trainer(target):
        parts += [(f"{type(target).__name__}.{k}", v) for k, v in vars(target).items()]
    parts.append((f"the target {getattr(target, '__qualname__', type(target).__name__)}",
                  target))
    parts += [(f"argument {i} of start()", a) for i, a in enumerate(payload.args)]
    parts += [(f"keyword argument {k!r} of start()", v) for k, v in payload.kwargs.items()]
    if payload.a_config is not None:
        parts += [(f"ArtefactsConfig.{f.name}", getattr(payload.a_config, f.name))
                  for f in dataclasses.fields(payload.a_config)]
    for name, value in parts:
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{name} ({type(value).__name__})"
    return None


def on_a_device(storage: torch.UntypedStorage) -> str | None:
    """Where torch would restore ``storage`` when it is unpickled (``cuda:1``), when that is not
    the CPU; ``None`` for the CPU and for the ``meta`` device, which holds no data to copy."""
    tag = location_tag(storage)
    return None if tag == "cpu" or storage.device.type == "meta" else tag


class _CpuPickler(cloudpickle.Pickler):
    """cloudpickle's pickler, which sends the storages of :func:`on_a_device` as CPU copies.

    torch pickles a tensor's data as a typed storage (a tensor of the dtypes that it pickles
    as an untyped storage, such as ``uint16``, cannot be unpickled with torch 2.13, on any
    device).
    """

    def __init__(self, file: io.BytesIO, hollow: frozenset[int]) -> None:
        super().__init__(file)
        self.moved = Moved()
        self._hollow = {address: _Hollow(0) for address in hollow}
        # One copy per block of device memory and dtype, so that views of it share their copy
        # (the same object is pickled once).
        self._copies: dict[tuple[str, int, torch.dtype], torch.TypedStorage] = {}
        # Each file's lines, one object per file, so that the pickle holds them once.
        self._sources: dict[str, tuple[str, ...] | None] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType):
            try:
                return _code, (marshal.dumps(obj), obj.co_filename, self._source(obj))
            except ValueError:  # a constant that marshal cannot write (made at run time)
                return super().reducer_override(obj)
        if isinstance(obj, torch.TypedStorage):
            untyped = obj._untyped_storage
            hollow = self._hollow.get(untyped.data_ptr())
            if hollow is not None:
                hollow.nbytes = untyped.nbytes()
                return _uninitialised, (hollow, obj.dtype)
            device = on_a_device(untyped)
            if device is not None:
                return _as_is, (self._cpu_copy(obj, device),)
        return super().reducer_override(obj)

    def _source(self, code: types.CodeType) -> tuple[str, ...] | None:
        """The lines of ``code``'s file as :mod:`linecache` has them here (a Jupyter cell's
        too), or ``None`` for code without a file (``<string>``, ``<stdin>``)."""
        filename = code.co_filename
        if filename not in self._sources:
            self._sources[filename] = tuple(linecache.getlines(filename)) or None
        return self._sources[filename]

    def _cpu_copy(self, storage: torch.TypedStorage, device: str) -> torch.TypedStorage:
        untyped = storage._untyped_storage
        key = (device, untyped.data_ptr(), storage.dtype)
        if key in self._copies:
            return self._copies[key]
        data = torch.UntypedStorage(untyped.nbytes()).copy_(untyped)
        copy = torch.TypedStorage(wrap_storage=data, dtype=storage.dtype, _internal=True)
        self.moved.storages += 1
        self.moved.nbytes += untyped.nbytes()
        self.moved.devices.add(device)
        if untyped.nbytes():  # empty storages may share an address, never data
            self._copies[key] = copy
        return copy


def _code(data: bytes, filename: str, source: tuple[str, ...] | None) -> types.CodeType:
    """A code object that :meth:`_CpuPickler.reducer_override` sent; its file's lines go to
    :mod:`linecache` (where this process has not read that file itself), never to be read
    again from a file that may have changed since or not be here at all."""
    if source is not None and filename not in linecache.cache:
        # No modification time: linecache.checkcache leaves such an entry alone.
        linecache.cache[filename] = (sum(map(len, source)), None, list(source), filename)
    return marshal.loads(data)


def _as_is(value: Any) -> Any:
    return value


class _Hollow:
    """A storage sent without its data: pickled once, however many tensors view it, so that
    they view one storage again when unpickled."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.storage: torch.UntypedStorage | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "storage": None}


def _uninitialised(hollow: _Hollow, dtype: torch.dtype) -> torch.TypedStorage:
    if hollow.storage is None:
        hollow.storage = torch.UntypedStorage(hollow.nbytes)
    return torch.TypedStorage(wrap_storage=hollow.storage, dtype=dtype, _internal=True)
