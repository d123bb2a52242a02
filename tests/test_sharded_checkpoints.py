"""Checkpoints of models sharded with FSDP2 (``fully_shard``): every rank writes its own rows,
the manifest says where each slice lies, and the checkpoint restores exactly at any world size
into either strategy; today's DDP checkpoints load into sharded models; any checkpoint exports
as Hugging Face's layout.

Four launches of tests/scripts/sharded_checkpoints.py (gloo, CPU), each restoring what the
earlier ones wrote and writing what it restored, whole (gathered), for the tests to compare:

- A, FSDP on 2: restores ``v3_2`` (a DDP checkpoint of 2 processes written by ddpw at ab7d516,
  format version 3), then trains and saves ``fsdp_1`` (asynchronously) and ``fsdp_2``;
- B, whole on 2 (as DDP): restores ``fsdp_2``, then saves ``plain_1`` and ``plain_2``;
- C, FSDP on 3: restores ``fsdp_2`` and ``plain_2``, then saves ``three_1`` and ``three_2``;
- D, whole on 1: restores ``fsdp_1``, ``three_2`` and ``damaged_2`` (``fsdp_2`` with a byte of
  rank 1's model file changed), and saves DTensors placed otherwise than ``Shard(0)`` on a 1-D
  mesh.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from accelerate import load_checkpoint_in_model

from ddpw import ConfigError
from ddpw import checkpoint as ckpt
from ddpw.checkpoint.export import export
from ddpw.checkpoint.reading import catalogue
from ddpw.checkpoint.slices import rows_of
from ddpw.checkpoint.tensors import MappedFile

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "sharded_checkpoints.py"
V3 = REPO / "tests" / "data" / "checkpoint-v3"
_spec = importlib.util.spec_from_file_location("sharded_checkpoints", SCRIPT)
assert _spec is not None and _spec.loader is not None
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)
Net = helper.Net


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, root: Path, out: Path, *args: str) -> None:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPT),
         "--root", str(root), "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The four launches' folder: ``checkpoint/`` and each run's states in ``A/`` .. ``D/``."""
    path = tmp_path_factory.mktemp("sharded")
    root = path / "checkpoint"
    root.mkdir()
    shutil.copytree(V3 / "v3_2", root / "v3_2")
    launch(2, root, path / "A", "--strategy", "fsdp", "--load", "v3_2", "--save", "fsdp")
    launch(2, root, path / "B", "--strategy", "plain", "--load", "fsdp_2", "--save", "plain")
    launch(3, root, path / "C", "--strategy", "fsdp", "--load", "fsdp_2", "plain_2",
           "--save", "three")
    shutil.copytree(root / "fsdp_2", root / "damaged_2")
    victim = root / "damaged_2" / "model-00002-of-00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    launch(1, root, path / "D", "--strategy", "plain", "--load", "fsdp_1", "three_2",
           "damaged_2", "--refusals")
    return path


def tensor_bytes(file: Path) -> int:
    """The bytes of a safetensors file's tensors: the file less its length prefix and header."""
    with file.open("rb") as f:
        return file.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def states(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def assert_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 what: str) -> None:
    """Bit for bit, with dtypes and shapes, the same keys."""
    assert set(found) == set(expected), (what, sorted(set(found) ^ set(expected)))
    for key, tensor in expected.items():
        assert found[key].dtype == tensor.dtype and torch.equal(found[key], tensor), (what, key)


# --- restoring ------------------------------------------------------------------------------------


def test_a_sharded_checkpoint_restores_exactly_at_any_world_size_into_either_strategy(runs):
    saved = {name: states(runs / run / f"saved-{name}.safetensors")
             for run, name in (("A", "fsdp_1"), ("A", "fsdp_2"), ("B", "plain_2"),
                               ("C", "three_2"))}
    # Every parameter's AdamW state (9 parameters: the tied weight once) and the buffer.
    assert len(saved["fsdp_2"]) == 9 * 3 + 11
    assert not torch.equal(saved["fsdp_1"]["model/embed.weight"],
                           saved["fsdp_2"]["model/embed.weight"])
    for run, name, source, what in (
            ("B", "fsdp_2", "fsdp_2", "FSDP 2 -> whole 2 (DDP)"),
            ("C", "fsdp_2", "fsdp_2", "FSDP 2 -> FSDP 3"),
            ("C", "plain_2", "plain_2", "whole 2 (DDP) -> FSDP 3"),
            ("D", "fsdp_1", "fsdp_1", "FSDP 2, saved asynchronously -> whole 1"),
            ("D", "three_2", "three_2", "FSDP 3, a rank without rows of some -> whole 1")):
        assert_equal(states(runs / run / f"loaded-{name}.safetensors"), saved[source], what)
    # A DDP checkpoint of format version 3 (today's before slices) into FSDP 2, tied and all.
    expected = states(V3 / "expected.safetensors")
    assert_equal(states(runs / "A" / "loaded-v3_2.safetensors"), expected, "v3 DDP -> FSDP 2")
    assert ckpt.read_manifest(runs / "checkpoint" / "v3_2")["version"] == 3


def test_each_rank_writes_its_own_rows_and_the_manifest_says_where_they_lie(runs):
    root = runs / "checkpoint"
    for name, ranks in (("fsdp_2", 2), ("three_2", 3)):
        folder = root / name
        manifest = ckpt.verify(folder)
        assert (manifest["version"], manifest["shares"], manifest["world_size"]) == (4, ranks,
                                                                                      ranks)
        files = [[f"{part}-{r + 1:05d}-of-{ranks:05d}.safetensors" for r in range(ranks)]
                 for part in ("model", "optimiser")]
        # No index: Hugging Face's loaders would take each key to lie whole in one file.
        assert not (folder / "model.safetensors.index.json").exists()
        assert not (folder / "optimiser.shares.json").exists()
        with pytest.raises(ValueError, match=r"index\.json"):
            load_checkpoint_in_model(Net(seed=3), str(folder))
        sliced = manifest["sliced"]
        model = Net(seed=3).state_dict()
        # Every parameter is sliced (the tied head once), the buffer is not.
        assert set(sliced["model"]) == set(model) - {"scale", "head.weight"}
        assert len(sliced["optimiser"]) == 9 * 2  # exp_avg and exp_avg_sq; the steps whole
        payload = [0] * ranks
        for part, records in sliced.items():
            for key, record in records.items():
                shape = record["shape"]
                if part == "model":
                    assert shape == list(model[key].shape), key
                assert record["dtype"] == "F32"
                expected = []
                for r in range(ranks):
                    first, rows = rows_of(shape[0], ranks, r)
                    if rows:
                        expected.append([files[part != "model"][r], first, rows])
                        payload[r] += rows * 4 * (shape[1] if len(shape) > 1 else 1)
                assert record["slices"] == expected, (part, key)
                for file, _, rows in record["slices"]:  # as the files hold them
                    with safetensors.safe_open(str(folder / file), framework="pt") as f:
                        assert f.get_slice(key).get_shape() == [rows, *shape[1:]]
        if ranks == 3:  # 4 rows on 3 ranks: 2, 2 and none
            assert [s[2] for s in sliced["model"]["blocks.1.0.weight"]["slices"]] == [2, 2]
        # Every tensor is written once, by one rank: the sliced ones in rows, the whole ones
        # (the buffer, 9 float step counts) dealt out.
        in_files = [sum(tensor_bytes(folder / files[p][r]) for p in (0, 1))
                    for r in range(ranks)]
        whole = 16 * 4 + 9 * 4
        assert sum(in_files) == sum(payload) + whole
        assert all(0 <= f - p <= whole for f, p in zip(in_files, payload, strict=True))
        # Each rank holds about 1/N, as torch.chunk splits the rows: on 2 ranks evenly, on 3
        # this small model's 3, 4, 5 and 16 rows leave the last rank less (828 of 4116 bytes).
        even = sum(payload) / ranks
        assert all(abs(p - even) < 0.1 * even for p in payload) if ranks == 2 else \
            max(payload) < 1.25 * even and payload[2] < payload[0] == payload[1], payload
    # A DDP checkpoint keeps Hugging Face's index and has nothing sliced.
    plain = ckpt.verify(root / "plain_2")
    assert plain["version"] == 4 and "sliced" not in plain
    assert (root / "plain_2" / "model.safetensors.index.json").is_file()


def test_a_damaged_slice_is_refused_naming_its_file_and_a_checkpoint_that_does_not_fit(runs):
    folder = runs / "checkpoint" / "damaged_2"
    said = (runs / "D" / "loaded-damaged_2.error").read_text()
    assert said == (f"checkpoint {folder} is damaged: the BLAKE3 hash of "
                    f"model-00002-of-00002.safetensors differs from the manifest's (the file "
                    f"was altered or corrupted). Use another checkpoint.")
    assert not (runs / "D" / "loaded-damaged_2.safetensors").exists()
    # A DTensor placed otherwise is refused, named, with what a checkpoint takes.
    takes = ("a checkpoint takes a DTensor placed (Shard(dim=0),) on a 1-D device mesh, as "
             "fully_shard makes them.")
    assert (runs / "D" / "refusals.txt").read_text().splitlines() == [
        f"cannot store optimiser tensor '{key}' in a checkpoint: it is a DTensor placed "
        f"{placed} on a {mesh}-D device mesh; {takes}"
        for key, placed, mesh in (("replicated", "(Replicate(),)", 1),
                                  ("columns", "(Shard(dim=1),)", 1),
                                  ("square", "(Shard(dim=0), Shard(dim=0))", 2))]
    with pytest.raises(ConfigError) as caught:
        ckpt.verify(folder)
    assert str(caught.value) == said
    # Before any process starts, from the headers and the manifest's whole shapes.
    sharded = runs / "checkpoint" / "fsdp_2"

    class Wider(Net):
        def __init__(self) -> None:
            super().__init__(seed=3)
            self.embed = torch.nn.Embedding(6, 16)
            self.head = torch.nn.Linear(16, 6, bias=False)
            self.head.weight = self.embed.weight
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError) as caught:
        ckpt.check_fits(sharded, Wider())
    assert str(caught.value) == (
        f"checkpoint {sharded} does not fit the model (Wider): missing: extra.weight, "
        f"extra.bias; wrong shape: embed.weight is (5, 16) in the checkpoint, (6, 16) in the "
        f"model, head.weight is (5, 16) in the checkpoint, (6, 16) in the model.")
    ckpt.check_fits(sharded, Net(seed=3))


def test_a_sharded_checkpoint_reads_whole_in_one_process(runs):
    saved = states(runs / "C" / "saved-three_2.safetensors")
    folder = runs / "checkpoint" / "three_2"
    model = Net(seed=3)
    ckpt.read_model(folder, model, "cpu")
    assert model.head.weight is model.embed.weight
    assert_equal({f"model/{k}": t for k, t in model.state_dict().items()},
                 {k: t for k, t in saved.items() if k.startswith("model/")}, "read_model")
    # A rank reads only its rows: in place in the mapped file where one slice holds them all,
    # else just those rows copied together from the slices that do.
    files: dict[str, MappedFile] = {}
    stored, _ = catalogue(folder, ckpt.read_manifest(folder), "model",
                          lambda name: files.setdefault(name, MappedFile(folder / name)))
    embed = stored["embed.weight"]  # 5 rows on 3 ranks: 0-1, 2-3, 4
    assert [(first, len(piece)) for first, piece in embed.pieces] == [(0, 2), (2, 2), (4, 1)]
    inside = embed.rows(2, 2)
    in_file = files["model-00002-of-00003.safetensors"].data.untyped_storage().data_ptr()
    assert inside.untyped_storage().data_ptr() == in_file
    across = embed.rows(1, 3)  # rows 1 to 3 lie in two slices: those rows alone, copied
    assert across.untyped_storage().data_ptr() not in {
        f.data.untyped_storage().data_ptr() for f in files.values()}
    assert across.untyped_storage().nbytes() == 3 * 16 * 4
    assert torch.equal(across, saved["model/embed.weight"][1:4])
    optimiser = ckpt.read_part(folder, "optimiser")
    assert_equal({f"optimiser/{n}/{name}": t for n, state in optimiser["state"].items()
                  for name, t in state.items()},
                 {k: t for k, t in saved.items() if k.startswith("optimiser/")}, "read_part")


# --- export -----------------------------------------------------------------------------------


def command(*args: str) -> subprocess.CompletedProcess:
    """``ddpw-export`` as its console script runs it (setup.cfg), in this worktree."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", "import sys; from ddpw.cli_export import "
                           "main; sys.argv[0] = 'ddpw-export'; sys.exit(main())", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def test_ddpw_export_writes_any_checkpoint_as_hugging_faces_layout(runs, tmp_path):
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "ddpw-export = ddpw.cli_export:main" in setup["options.entry_points"]["console_scripts"]
    root = runs / "checkpoint"
    cases: list[tuple[str, str, list[str], Any]] = [
        ("fsdp_2", "A", [], ["model.safetensors"]),
        ("three_2", "C", ["--max-shard-size", "600B"], 3),
        ("plain_2", "B", ["--max-shard-size", "1KiB"], 2)]
    for name, run, flags, files in cases:
        out = tmp_path / name
        done = command(str(root / name), str(out), *flags)
        assert done.returncode == 0, done.stderr
        written = sorted(p.name for p in out.iterdir())
        if isinstance(files, int):
            shards = [f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(1, files + 1)]
            assert written == [*shards, "model.safetensors.index.json"]
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"].values()) == set(shards)
            for shard in shards:  # none above the size but for one tensor larger than it
                with safetensors.safe_open(str(out / shard), framework="pt") as f:
                    assert f.metadata() == {"format": "pt"}
                    sizes = [f.get_slice(k).get_shape() for k in f.keys()]
                assert len(sizes) == 1 or sum(4 * torch.Size(s).numel() for s in sizes) <= \
                    (600 if name == "three_2" else 1024), (name, shard)
        else:
            assert written == files
        assert done.stderr == f"ddpw-export: wrote {', '.join(written)} into {out}\n"
        # Loaded as Hugging Face's tools load it, into a fresh model: the tied weight stored
        # once (as save_pretrained stores it), tied again in the model.
        fresh = Net(seed=7)
        load_checkpoint_in_model(fresh, str(out), strict=True)
        assert fresh.head.weight is fresh.embed.weight
        saved = states(runs / run / f"saved-{name}.safetensors")
        assert_equal({f"model/{k}": t for k, t in fresh.state_dict().items()},
                     {k: t for k, t in saved.items() if k.startswith("model/")}, name)
        with safetensors.safe_open(str(out / written[0]), framework="pt") as f:
            assert "head.weight" not in f.keys()
    # The function, too: a size below every tensor's gives each its own file.
    files = export(root / "fsdp_2", tmp_path / "each", max_shard_bytes=1)
    assert len(files) == 10 + 1 and not (tmp_path / ".each.partial").exists()


def test_ddpw_export_refuses_in_one_line(runs, tmp_path):
    root = runs / "checkpoint"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    (tmp_path / "empty").mkdir()
    for args, said in (
            ([str(root), str(tmp_path / "o1")],
             f"{root} is not a ddpw checkpoint: it has no manifest.json."),
            ([str(root / "fsdp_2"), str(tmp_path / "full")],
             f"{tmp_path / 'full'} already exists and is not an empty folder: give a new one."),
            ([str(root / "damaged_2"), str(tmp_path / "o2")],
             f"checkpoint {root / 'damaged_2'} is damaged: the BLAKE3 hash of "
             f"model-00002-of-00002.safetensors differs from the manifest's (the file was "
             f"altered or corrupted). Use another checkpoint."),
            ([str(root / "fsdp_2"), str(tmp_path / "o3"), "--max-shard-size", "5 parsecs"],
             "max shard size '5 parsecs' is not a size: give a whole number of bytes above 0, "
             "with a unit or not (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB.")):
        done = command(*args)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", f"ddpw-export: {said}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]
    done = command(str(root / "fsdp_2"), str(tmp_path / "empty"))  # an empty folder is fine
    assert done.returncode == 0 and (tmp_path / "empty" / "model.safetensors").is_file()
