"""Small models, data and Trainers shared by the end-to-end tests.

They live in an importable module (not in a test file) so that worker processes import them by
reference, as they would a user's own package.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import Dataset

from ddpw import ArtefactsConfig, JobConfig, JobMode, Trainer


class Blobs(Dataset):
    """``n`` samples of two Gaussian blobs in 8 dimensions, each with its index."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class Net(nn.Module):
    """A small MLP with dropout, so that exact resume depends on the RNG states too."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BlobTrainer(Trainer):
    """Cross-entropy on Blobs; records which samples this rank trained on."""

    def train_step(self, batch):
        x, y, index = batch
        self.__dict__.setdefault("seen", []).extend(index.tolist())
        self.__dict__.setdefault("seen_order", []).extend(index.tolist())
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, y),
                "accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate_step(self, batch):
        x, y, _ = batch
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="none"),
                "accuracy": (logits.argmax(1) == y).float()}


class InspectingTrainer(BlobTrainer):
    """Also reports, from every rank, its parameters and the samples it saw."""

    def run(self):
        metrics = super().run()
        params = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        return {**metrics, "params": gather_object([params.cpu()]),
                "seen_order": self.__dict__.get("seen_order", []),
                "seen": gather_object([sorted(self.__dict__.get("seen", []))]),
                "distributed_type": str(self.accelerator.distributed_type)}


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def step_lr(optimiser: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(optimiser, step_size=3, gamma=0.7)


def artefacts(n_train: int = 150, n_test: int = 61, **overrides) -> ArtefactsConfig:
    fields = dict(train_set=Blobs(n_train), test_set=Blobs(n_test, seed=1), batch_size=8,
                  model=Net(), optimiser_loader=adam)
    fields.update(overrides)
    return ArtefactsConfig(**fields)


def job(path, mode: JobMode = JobMode.TRAIN, start_at: int = 0, epochs: int = 4,
        save_every: int = 2, **overrides) -> JobConfig:
    return JobConfig(job_type=mode, start_at=start_at, epochs=epochs, save_every=save_every,
                     checkpoint_path=str(path / "checkpoint"),
                     training_logs_path=str(path / "logs"), **overrides)


class PausingTrainer(BlobTrainer):
    """Asks for a pause on one rank only, in the middle of an epoch."""

    def __init__(self, j_config: JobConfig, at: tuple[int, int], rank: int = 1) -> None:
        super().__init__(j_config)
        self.at, self.pausing_rank = at, rank

    def train_step(self, batch):
        if (self.epoch, self.batch) == self.at and self.global_rank == self.pausing_rank:
            self.request_pause()
        return super().train_step(batch)


#: When this module was imported: in a launched process, after the process had started.
IMPORTED = time.time()


class KillingTrainer(BlobTrainer):
    """Rank 0 notes the optimiser step it reached in ``killed-at`` beside the checkpoints and
    dies (``os._exit``) in the middle of the step at ``at`` (epoch, batch done), after sleeping
    1.2 s in the step before, so that its goodput record (rewritten at most once a second) is
    of the step it reached."""

    def __init__(self, j_config: JobConfig, at: tuple[int, int]) -> None:
        super().__init__(j_config)
        self.at = at

    def train_step(self, batch):
        if self.global_rank == 0 and (self.epoch, self.batch + 1) == self.at:
            time.sleep(1.2)
        if self.global_rank == 0 and (self.epoch, self.batch) == self.at:
            folder = Path(self.j_config.checkpoint_path).parent
            (folder / "killed-at").write_text(str(self.global_step))
            os._exit(9)
        return super().train_step(batch)


class ImportNotingTrainer(BlobTrainer):
    """Returns, with the metrics, when the process imported this module (:data:`IMPORTED`) and
    when its set-up began."""

    def setup(self, accelerator, p_config, a_config):
        self.setup_began = time.time()
        super().setup(accelerator, p_config, a_config)

    def run(self):
        return {**super().run(), "imported": IMPORTED, "setup_began": self.setup_began}


class SlowTrainer(BlobTrainer):
    """Takes its time and tells, through a file, when it is in the middle of epoch 2."""

    def train_step(self, batch):
        import time
        from pathlib import Path

        time.sleep(0.05)
        if self.epoch == 2 and self.batch == 3 and self.global_rank == 0:
            Path(self.j_config.checkpoint_path).parent.joinpath("mid-epoch").touch()
        return super().train_step(batch)


def goodput_of(folder: Path) -> tuple[list[dict], dict]:
    """The attempts and the summary of the one job whose goodput (:mod:`ddpw.goodput`) the
    training logs ``folder`` holds, once checked that its parts add up to its wall time, which
    runs from the first attempt's launch to the last one's end."""
    (path,) = Path(folder).glob("goodput-*.json")
    record = json.loads(path.read_text())
    attempts, summary = record["attempts"], record["summary"]
    assert math.isclose(sum(summary["seconds"].values()), summary["wall_s"], rel_tol=1e-9)
    assert math.isclose(summary["wall_s"], attempts[-1]["end"] - attempts[0]["start"],
                        rel_tol=0.01), summary
    return attempts, summary


def final_files(folder) -> dict[str, bytes]:
    """What a checkpoint holds that an exact resume must reproduce bit for bit: each tensor of
    the model and the optimiser (whichever ranks wrote them, in whichever files), by name,
    and the scheduler's state if there is one."""
    from ddpw.checkpoint.layout import tensor_files
    from ddpw.checkpoint.tensors import map_tensors

    found = {name: (folder / name).read_bytes() for name in ("scheduler.json",)
             if (folder / name).is_file()}
    for part in ("model", "optimiser"):
        paths = tensor_files(folder, part)
        assert paths, f"{folder} holds no {part} tensors"
        tensors, _ = map_tensors(paths)
        found |= {f"{part}/{key}": f"{t.dtype} {tuple(t.shape)}".encode() + t.numpy().tobytes()
                  for key, t in tensors.items()}
    return found


def evaluate_job(path, start_at) -> JobConfig:
    return job(path, mode=JobMode.EVALUATE, start_at=start_at)


def wait_for_mid_epoch(folder, process, timeout: float = 120) -> None:
    """Wait until a SlowTrainer run in ``process`` (started in ``folder``) is inside epoch 2."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while not (Path(folder) / "mid-epoch").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


class ErrorNotingTrainer(BlobTrainer):
    """Notes the error that each rank ends with in ``{training_logs_path}/rank-R.error``."""

    def run(self):
        from pathlib import Path

        try:
            return super().run()
        except BaseException as error:
            folder = Path(self.j_config.training_logs_path)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank-{self.global_rank}.error").write_text(
                f"{type(error).__name__}: {error}")
            raise


class ProbeNet(Net):
    """A Net that notes, inside ``forward``, the dtype of its first layer's output: under
    autocast, the dtype that autocast computes in (``bfloat16``, ``float16``), else the
    parameters' own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body[0](x)
        self.forward_dtype = hidden.dtype
        return self.body[1:](hidden)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """Every parameter of ``model`` (this rank's shards of a sharded one), flattened into one
    CPU tensor."""
    from torch.distributed.tensor import DTensor

    held = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([p.detach().flatten().cpu() for p in held])


class ProbeTrainer(InspectingTrainer):
    """Also reports where the job really ran: its device, where the parameters and the
    optimiser's state live, the dtype seen inside ``forward`` (a :class:`ProbeNet`'s), the
    process-group backend and the CUDA memory it holds (the main rank's, and every rank's in
    ``"ranks"``); the GradScaler's state, and the parameters right after set-up (a restored
    checkpoint's).

    With fp16 the GradScaler starts small and grows every 3 steps, so that its scale changes
    (and overflows now and then) within a short run: a resume that lost its state would differ.
    """

    def accelerator_kwargs(self, p_config):
        kwargs = super().accelerator_kwargs(p_config)
        if p_config.mixed_precision == "fp16":
            from accelerate.utils import GradScalerKwargs

            kwargs["kwargs_handlers"] = [GradScalerKwargs(init_scale=256.0, growth_interval=3)]
        return kwargs

    def setup(self, accelerator, p_config, a_config):
        super().setup(accelerator, p_config, a_config)
        self.restored = flat_parameters(self.model)
        self.restored_scaler = accelerator.scaler.state_dict() if accelerator.scaler else None

    def save_checkpoint(self):
        folder = super().save_checkpoint()
        # Where the asynchronous saves staged their copies: host buffers, pinned on CUDA (freed
        # when the job ends, so noted here).
        self.staging = sorted({f"{b.device.type}:{'pinned' if b.is_pinned() else 'pageable'}"
                               for b in self._ddpw.checkpoints._buffers.values()})
        return folder

    def run(self):
        import torch.distributed as dist

        result = super().run()
        model = self.accelerator.unwrap_model(self.model)
        state = self.optimiser.state.values() if self.optimiser is not None else []
        # Adam's step counts are 0-d CPU tensors wherever the parameters are.
        optimiser_devices = {v.device.type for s in state for v in s.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0}
        mine = {"device": self.device.type,
                "param_devices": sorted({p.device.type for p in model.parameters()}),
                "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                "optimiser_devices": sorted(optimiser_devices),
                "forward_dtype": str(getattr(model, "forward_dtype", None)),
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "cuda_bytes": torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0,
                "staging": getattr(self, "staging", []),
                "staging_left": len(self._ddpw.checkpoints._buffers)}
        scaler = self.accelerator.scaler
        # The main rank's facts at the top (the job's result is its); every rank's in "ranks".
        return {**result, **mine, "ranks": gather_object([mine]),
                "restored": self.restored, "restored_scaler": self.restored_scaler,
                "scaler": scaler.state_dict() if scaler is not None else None}


class PausingProbeTrainer(PausingTrainer, ProbeTrainer):
    """A ProbeTrainer that asks for a pause on one rank, in the middle of an epoch."""


def wait_for_ranks(folder, process, world_size: int = 2, timeout: float = 120) -> list[int]:
    """Wait until every rank of a job that ``process`` started has written its pid to
    ``{folder}/ready-{rank}``; return the pids, in rank order."""
    import time
    from pathlib import Path

    ready = [Path(folder) / f"ready-{rank}" for rank in range(world_size)]
    deadline = time.monotonic() + timeout  # a bound for a busy machine, not a speed
    while not all(p.is_file() and p.read_text() for p in ready):
        assert time.monotonic() < deadline and process.poll() is None, "the job did not start"
        time.sleep(0.2)
    return [int(p.read_text()) for p in ready]


class Blocks(nn.Module):
    """A model of repeated blocks (a ``ModuleList``, which FSDP shards block by block), wide
    enough that sharding its parameters and Adam's state shows in a process's memory; its
    output layer has an odd number of rows, which two ranks split unevenly."""

    def __init__(self, width: int = 1024, depth: int = 6) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU())
                                    for _ in range(depth))
        self.last = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        for block in self.blocks:
            x = block(x)
        return self.last(x)


class ShardInspectingTrainer(BlobTrainer):
    """Reports, from every rank, the parameters it holds (its shards under FSDP, flattened)
    and the samples it saw."""

    def run(self):
        from torch.distributed.tensor import DTensor

        metrics = super().run()
        held = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]
        return {**metrics, "held": gather_object([torch.cat([p.detach().flatten().cpu()
                                                              for p in held])]),
                "seen": gather_object([sorted(self.__dict__.get("seen", []))])}


def shard_files(folder) -> dict[str, bytes]:
    """Every tensor of a checkpoint's model and optimiser files, by file and name: what a run
    of the same world size and strategy writes bit for bit the same (a sharded checkpoint
    keeps a tensor's slices under the same name in several files)."""
    from ddpw.checkpoint.tensors import map_tensors

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name.startswith(("model", "optimiser")):
            tensors, _ = map_tensors([path])
            found |= {f"{path.name}/{key}": f"{t.dtype} {tuple(t.shape)}".encode()
                      + t.numpy().tobytes() for key, t in tensors.items()}
    assert found, f"{folder} holds no model or optimiser tensors"
    return found
