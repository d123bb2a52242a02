"""Checkpoint folders by name: positions, which checkpoints exist, which is latest, clean-up."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MANIFEST = "manifest.json"
LATEST = "latest"


@dataclass(frozen=True, order=True)
class Position:
    """Where a checkpoint stands: ``epochs`` complete, then ``batches`` into the next epoch."""

    epochs: int
    batches: int = 0

    def name(self, prefix: str) -> str:
        """The checkpoint folder's name."""
        return f"{prefix}_{self.epochs}" + (f"_batch{self.batches}" if self.batches else "")

    @classmethod
    def parse(cls, name: str, prefix: str) -> Position | None:
        """The position in a folder name, or ``None`` if it is not a checkpoint of ``prefix``."""
        match = re.fullmatch(re.escape(prefix) + r"_(\d+)(?:_batch(\d+))?", name)
        return cls(int(match.group(1)), int(match.group(2) or 0)) if match else None


def available(checkpoint_path: str | Path, prefix: str) -> list[str]:
    """Names of the complete checkpoints (those with a manifest), oldest position first."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return []
    found = [(position, entry.name) for entry in root.iterdir()
             if (position := Position.parse(entry.name, prefix)) is not None
             and (entry / MANIFEST).is_file()]
    return [name for _, name in sorted(found)]


def latest(checkpoint_path: str | Path, prefix: str) -> str | None:
    """The most recently written complete checkpoint, or ``None``.

    The marker file ``{prefix}_latest`` names it; if the marker is missing or names a checkpoint
    that is gone, the one written last (its manifest's ``sequence``) is taken.
    """
    marker = Path(checkpoint_path) / f"{prefix}_{LATEST}"
    names = available(checkpoint_path, prefix)
    if marker.is_file():
        named = marker.read_text().strip()
        if named in names:
            return named
    return by_write_order(checkpoint_path, names)[-1] if names else None


def by_write_order(checkpoint_path: str | Path, names: list[str]) -> list[str]:
    """``names`` sorted from the first written to the last (manifest ``sequence``)."""
    return sorted(names, key=lambda name: sequence(Path(checkpoint_path) / name))


def sequence(folder: Path) -> int:
    """The ``sequence`` in a checkpoint's manifest (its place in the order of writing), or 0
    when the manifest cannot be read."""
    try:
        return int(json.loads((folder / MANIFEST).read_text()).get("sequence", 0))
    except (OSError, ValueError):
        return 0


def resolve(checkpoint_path: str | Path, prefix: str, start_at: int | str) -> str | None:
    """The checkpoint that ``start_at`` asks for: a name, or ``None`` to start from scratch.

    :raises ConfigError: when it asks for a checkpoint that does not exist, listing those that do.
    """
    if start_at == LATEST:
        return latest(checkpoint_path, prefix)
    if isinstance(start_at, int) and start_at <= 0:
        return None
    name = Position(start_at).name(prefix) if isinstance(start_at, int) else start_at
    names = available(checkpoint_path, prefix)
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise ConfigError(f"JobConfig.start_at={start_at!r}: no checkpoint "
                          f"{Path(checkpoint_path) / name} (a folder with a {MANIFEST}). "
                          f"Checkpoints in {checkpoint_path} with prefix '{prefix}': {listed}.")
    return name


def staging_path(folder: Path) -> Path:
    """Where ``folder`` is written before it is renamed into place."""
    return folder.with_name(f".{folder.name}.partial")


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a crash midway leaves nothing named like one: it is
    renamed out of sight first, and :func:`tidy` finishes what a crash interrupted."""
    hidden = folder.with_name(f".{folder.name}.deleted")
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def tidy(checkpoint_path: str | Path, prefix: str) -> None:
    """Clean up after writes that a crash interrupted: delete hidden partial and discarded
    folders, and put back a checkpoint that :func:`~ddpw.checkpoint.manifest.publish` had
    moved aside when the crash came."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return
    for entry in root.glob(f".{prefix}_*"):
        if entry.name.endswith((".partial", ".deleted")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".old"):
            original = root / entry.name[1:-len(".old")]
            if original.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, original)


def prune(checkpoint_path: str | Path, prefix: str, keep_last: int,
          protect: tuple[str | None, ...]) -> None:
    """Delete all but the ``keep_last`` most recently written checkpoints, never ``protect``."""
    names = by_write_order(checkpoint_path, available(checkpoint_path, prefix))
    for name in names[:-keep_last]:
        if name not in protect:
            discard(Path(checkpoint_path) / name)
