"""``ddpw-export CHECKPOINT OUT``: a checkpoint's model in Hugging Face's layout
(:func:`ddpw.checkpoint.export.export`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import ConfigError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="The most bytes of tensors in one file, as Hugging Face writes a size "
                   "(5GB, 500MiB); a larger model is written in shards with an index.")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def main(checkpoint: Path, out: Path, max_shard_size: str) -> None:
    """Write the whole model of CHECKPOINT (a ddpw checkpoint folder of any world size, DDP or
    FSDP) into the new folder OUT as Hugging Face's layout: model.safetensors, or
    model-0000i-of-0000n.safetensors and model.safetensors.index.json. The checkpoint's hashes
    are checked first; one output file's tensors are in memory at a time."""
    from .checkpoint.export import export, shard_bytes  # torch: only once the flags are right

    try:
        written = export(checkpoint, out, shard_bytes(max_shard_size))
    except ConfigError as error:
        click.echo(f"ddpw-export: {error}", err=True)
        sys.exit(1)
    click.echo(f"ddpw-export: wrote {', '.join(p.name for p in written)} into {out}", err=True)


if __name__ == "__main__":
    main()
