"""Each rank's share of a checkpoint: how the tensors are dealt out, the Hugging Face layout the
shares make, resuming and evaluating across world sizes, and the check that every rank sees
the one checkpoint folder that they all write into."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from accelerate import load_checkpoint_in_model
from accelerate.utils import gather_object
from jobs import BlobTrainer, artefacts, job, step_lr
from torch import nn

from ddpw import ConfigError, JobMode, Platform, PlatformConfig, Wrapper, world
from ddpw import checkpoint as ckpt
from ddpw.checkpoint.checkpointer import Checkpointer
from ddpw.checkpoint.layout import assign

CPU1 = PlatformConfig(platform=Platform.CPU, verbose=False)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
CPU3 = PlatformConfig(platform=Platform.CPU, n_procs=3, verbose=False)
EXACT = {"scheduler_loader": step_lr}
#: The files of rank ``r``'s share of a 2-process checkpoint (``r + 1`` in the names).
SHARES = {r: [f"{part}-{r + 1:05d}-of-00002.safetensors" for part in ("model", "optimiser")]
          for r in (0, 1)}


class Deep(nn.Module):
    """An MLP of six layers, four of them alike: many tensors of a few sizes (with Adam's
    state, 48 of them, 12 of the largest), which whole tensors can split about evenly."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        middle = [m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())]
        self.body = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), *middle, nn.Linear(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> Path:
    """``ckpt_2`` of two epochs of Deep on 2 processes: every test below copies it before it
    writes anything next to it."""
    path = tmp_path_factory.mktemp("two-process")
    Wrapper(CPU2, artefacts(model=Deep(), **EXACT)).start(
        BlobTrainer(job(path, epochs=2, save_every=2)))
    return path / "checkpoint" / "ckpt_2"


def copied(folder: Path, path: Path) -> Path:
    """A copy of checkpoint ``folder`` in ``{path}/checkpoint``."""
    shutil.copytree(folder, path / "checkpoint" / folder.name)
    return path / "checkpoint" / folder.name


def payload(file: Path) -> int:
    """The bytes of a safetensors file's tensors: the file less its length prefix and header."""
    with file.open("rb") as f:
        return file.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


# --- dealing the tensors out --------------------------------------------------------------------


def test_assign_deals_the_largest_first_to_the_share_with_the_fewest_bytes_ties_to_the_lower():
    # 9 to share 0, 7 to 1, 5 to 1 (7 < 9), 2 to 0 (9 < 12).
    assert assign([5, 9, 2, 7], 2) == [1, 0, 0, 1]
    # Equal sizes: the earlier item first, the lower share on a tie of loads.
    assert assign([4, 4, 4, 4], 2) == [0, 1, 0, 1]
    assert assign([3, 3, 3], 1) == [0, 0, 0]
    assert assign([1, 2, 3], 5) == [2, 1, 0]  # more shares than items: one each, largest to 0
    assert assign([], 3) == []


def test_assign_balances_within_the_largest_item_and_near_the_best_split_of_two():
    """Largest-first greedy: no share exceeds another by more than the largest item, and with
    two shares the larger is at most 7/6 of the best split's (Graham's bound for 2)."""
    rng = random.Random(14)
    for trial in range(300):
        shares = (2, 3, 4)[trial % 3]
        sizes = [rng.choice((4, 8, 64, 512, 4096)) * rng.randint(1, 64)
                 for _ in range(rng.randint(1, 12))]
        owners = assign(sizes, shares)
        assert all(0 <= owner < shares for owner in owners), (sizes, owners)
        loads = [sum(s for s, o in zip(sizes, owners, strict=True) if o == share)
                 for share in range(shares)]
        assert max(loads) - min(loads) <= max(sizes), (sizes, owners)
        if shares == 2:
            best = min(max(sum(c), sum(sizes) - sum(c)) for k in range(len(sizes) + 1)
                       for c in itertools.combinations(sizes, k))
            assert max(loads) * 6 <= best * 7, (sizes, owners, best)


def test_assign_gives_every_process_the_same_answer_from_the_same_sizes():
    """Every rank computes the assignment alone, with no message to agree on it: another
    interpreter, with other hash seeds, deals the same sizes out alike."""
    rng = random.Random(7)
    sizes = [rng.choice((4, 64, 4096)) for _ in range(200)]
    here = assign(sizes, 3)
    for seed in ("1", "2"):
        there = subprocess.run(
            [sys.executable, "-c", "import json, sys; from ddpw.checkpoint.layout import assign; "
             "print(json.dumps(assign(json.loads(sys.argv[1]), 3)))", json.dumps(sizes)],
            capture_output=True, text=True, check=True, timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(there.stdout) == here


def test_each_rank_of_a_two_process_checkpoint_writes_about_half_of_its_bytes(two_process):
    manifest = ckpt.verify(two_process)
    assert manifest["shares"] == 2 and manifest["world_size"] == 2
    files = manifest["files"]
    assert {name for names in SHARES.values() for name in names} <= set(files)
    written = [sum(files[name]["bytes"] for name in SHARES[r]) for r in (0, 1)]
    tensors = [sum(payload(two_process / name) for name in SHARES[r]) for r in (0, 1)]
    # Every tensor of the model and the optimiser is written once, by one rank or the other.
    sizes = [t.numel() * t.element_size() for t in Deep().state_dict().values()]
    optimiser = ckpt.read_part(two_process, "optimiser")
    sizes += [t.numel() * t.element_size()
              for state in optimiser["state"].values() for t in state.values()]
    assert len(sizes) == 48 and sum(tensors) == sum(sizes)
    # Whole tensors cannot split the bytes exactly: the ranks differ by less than the largest
    # tensor (a 64 x 64 layer, or its Adam state: 16 KiB of about 200 KiB), and the files,
    # headers included, by less than 5 % of a half.
    assert abs(tensors[0] - tensors[1]) < max(sizes), tensors
    assert abs(written[0] - written[1]) < 0.05 * sum(written) / 2, written


# --- Hugging Face's layout -----------------------------------------------------------------------


def test_the_shares_of_a_two_process_checkpoint_load_with_accelerate_as_ddpw_reads_them(
        two_process):
    index = json.loads((two_process / "model.safetensors.index.json").read_text())
    trained = Deep(seed=2)
    ckpt.read_model(two_process, trained, "cpu")
    state = trained.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {SHARES[0][0], SHARES[1][0]}  # both ranks'
    for name in set(index["weight_map"].values()):  # each key where the index says it is
        with safetensors.safe_open(str(two_process / name), framework="pt") as shard:
            assert set(shard.keys()) == {k for k, n in index["weight_map"].items() if n == name}
    fresh = Deep(seed=3)
    assert not torch.equal(fresh.body[0].weight, trained.body[0].weight)
    # accelerate finds the index in the folder (the only *.index.json there: the optimiser's
    # is optimiser.shares.json) and reads each shard with safetensors itself.
    load_checkpoint_in_model(fresh, str(two_process), strict=True)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[key]), key


# --- across world sizes --------------------------------------------------------------------------


def test_a_checkpoint_of_two_processes_evaluates_on_one_process_as_on_two(two_process, tmp_path):
    folder = copied(two_process, tmp_path)
    numbers = [Wrapper(p_config, artefacts(model=Deep(seed=5))).start(
        BlobTrainer(job(tmp_path, mode=JobMode.EVALUATE, start_at=2)))
        for p_config in (CPU1, CPU2)]
    assert numbers[0] == numbers[1]
    untrained = Wrapper(CPU1, artefacts(model=Deep(seed=5))).start(
        BlobTrainer(job(tmp_path / "untrained", mode=JobMode.EVALUATE, start_at=-1)))
    assert numbers[0] != untrained  # the checkpoint's weights were evaluated, not the model's
    ckpt.verify(folder)


class RestoringTrainer(BlobTrainer):
    """Also reports, from every rank, the model, optimiser and scheduler states that it
    restored, as they were right after set-up."""

    def setup(self, accelerator, p_config, a_config):
        super().setup(accelerator, p_config, a_config)
        model = accelerator.unwrap_model(self.model)
        self.restored = {"model": {k: t.detach().clone() for k, t in model.state_dict().items()},
                         "optimiser": _cloned(self.optimiser.state_dict()),
                         "scheduler": _cloned(self.scheduler.state_dict())}

    def run(self):
        return {**super().run(), "restored": gather_object([self.restored])}


def _cloned(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def assert_same(restored: Any, stored: Any, where: str = "") -> None:
    """``restored`` and ``stored`` hold the same values: tensors bit for bit, with their dtypes
    and shapes; containers of the same types and keys."""
    if isinstance(stored, torch.Tensor):
        assert isinstance(restored, torch.Tensor), where
        assert (restored.dtype, restored.shape) == (stored.dtype, stored.shape), where
        assert torch.equal(restored.cpu(), stored.cpu()), where
    elif isinstance(stored, dict):
        assert isinstance(restored, dict) and set(restored) == set(stored), where
        for key in stored:
            assert_same(restored[key], stored[key], f"{where}/{key}")
    elif isinstance(stored, (list, tuple)):
        assert type(restored) is type(stored) and len(restored) == len(stored), where
        for i, (r, s) in enumerate(zip(restored, stored, strict=True)):
            assert_same(r, s, f"{where}/{i}")
    else:
        assert restored == stored, where


def stored(folder: Path) -> dict[str, Any]:
    """What checkpoint ``folder`` holds of the model, the optimiser and the scheduler."""
    model = Deep(seed=4)
    ckpt.read_model(folder, model, "cpu")
    return {"model": model.state_dict(), "optimiser": ckpt.read_part(folder, "optimiser"),
            "scheduler": ckpt.read_part(folder, "scheduler")}


def test_a_two_process_checkpoint_resumes_on_one_process_and_that_one_on_two_with_every_tensor(
        two_process, tmp_path):
    root = copied(two_process, tmp_path).parent
    one = Wrapper(CPU1, artefacts(model=Deep(seed=5), **EXACT)).start(
        RestoringTrainer(job(tmp_path, start_at=2, epochs=3, save_every=1)))
    assert one["epoch"] == 3 and len(one["restored"]) == 1
    assert_same(one["restored"][0], stored(root / "ckpt_2"))
    # The world of one wrote the single files, which both ranks of the next run read.
    names = {p.name for p in (root / "ckpt_3").iterdir()}
    assert {"model.safetensors", "optimiser.safetensors"} <= names
    assert not any("-of-" in name or name.endswith(".index.json") for name in names), names
    assert ckpt.verify(root / "ckpt_3")["shares"] == 1
    two = Wrapper(CPU2, artefacts(model=Deep(seed=5), **EXACT)).start(
        RestoringTrainer(job(tmp_path, start_at=3, epochs=4, save_every=1)))
    assert two["epoch"] == 4 and len(two["restored"]) == 2
    three = stored(root / "ckpt_3")
    for rank, restored in enumerate(two["restored"]):
        assert_same(restored, three, f"rank {rank}")
    assert ckpt.verify(root / "ckpt_4")["shares"] == 2
    assert {SHARES[0][0], SHARES[1][0]} <= {p.name for p in (root / "ckpt_4").iterdir()}


# --- one folder for every rank ------------------------------------------------------------------


def open_checkpoints(roots: list[str], catch: bool) -> str:
    """Open a job's checkpoints in ``roots[rank]``, as a Trainer's set-up does; with ``catch``,
    return the error's text (or ``"ok"``) instead of raising it."""
    w = world()
    checkpoints = Checkpointer(Path(roots[w.global_rank]), "ckpt", keep_last=0, asynchronous=True,
                               rank=w.global_rank, world_size=w.world_size, device=w.device)
    try:
        checkpoints.open(writes=True)
    except ConfigError as error:
        if not catch:
            raise
        return f"ConfigError: {error}"
    checkpoints.close()
    return "ok"


def not_one_folder(root: Path, blind: str) -> str:
    host = socket.gethostname()
    return (f"JobConfig.checkpoint_path={str(root)!r} is not one folder for every rank: {blind} "
            f"cannot see what rank 0 (on {host}) writes there. Each rank writes a share of every "
            f"checkpoint, so give a path on a file system that every node mounts (not a "
            f"node-local disk such as /tmp).")


def probes(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.is_dir() for p in folder.glob(".ddpw-shared-*")]


def test_ranks_that_do_not_see_one_checkpoint_folder_all_get_a_config_error_naming_them(
        tmp_path):
    """Ranks 0 and 2 share a folder, rank 1 has its own, as if on a node-local disk: every rank
    gets the error, naming rank 1 alone (and the path as that rank has it: on a node-local
    disk, the same on every rank), and the main rank's probe file is gone."""
    shared, own = tmp_path / "shared", tmp_path / "node-local"
    own.mkdir()
    roots = [shared, own, shared]
    blind = f"rank 1 on {socket.gethostname()}"
    said = Wrapper(CPU3).start(open_checkpoints, [str(r) for r in roots], True)
    assert said == ["ConfigError: " + not_one_folder(root, blind) for root in roots]
    assert not probes(shared, own)
    # Raised, it reaches the caller as the ConfigError of the rank that failed first.
    with pytest.raises(ConfigError) as caught:
        Wrapper(CPU2).start(open_checkpoints, [str(r) for r in roots[:2]], False)
    assert str(caught.value) in {not_one_folder(root, blind) for root in roots}
    assert not probes(shared, own)


def test_ranks_that_share_the_checkpoint_folder_pass_the_check_and_leave_no_probe(tmp_path):
    root = tmp_path / "checkpoint"  # made by the check, as the first save would
    assert Wrapper(CPU2).start(open_checkpoints, [str(root)] * 2, True) == ["ok", "ok"]
    assert root.is_dir() and not probes(root)


class NodeLocalTrainer(BlobTrainer):
    """Rank 1 keeps its checkpoints in a folder of its own, as with a checkpoint path on a
    node-local disk; every rank notes each step it trains."""

    def setup(self, accelerator, p_config, a_config):
        if accelerator.process_index == 1:
            self.j_config.checkpoint_path += "-node-local"
        super().setup(accelerator, p_config, a_config)

    def train_step(self, batch):
        Path(self.j_config.training_logs_path).mkdir(parents=True, exist_ok=True)
        Path(self.j_config.training_logs_path, f"trained-{self.global_rank}").touch()
        return super().train_step(batch)


def test_a_training_job_whose_ranks_see_different_folders_fails_before_its_first_step(
        tmp_path):
    with pytest.raises(ConfigError) as caught:
        Wrapper(CPU2, artefacts()).start(NodeLocalTrainer(job(tmp_path, epochs=1)))
    root = tmp_path / "checkpoint"
    blind = f"rank 1 on {socket.gethostname()}"
    assert str(caught.value) in {not_one_folder(root, blind),
                                 not_one_folder(Path(f"{root}-node-local"), blind)}
    assert not list((tmp_path / "logs").glob("trained-*")), "a rank trained"
    assert ckpt.available(root, "ckpt") == [] and not probes(root)
