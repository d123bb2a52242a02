"""``python -m ddpw.sweep.point SWEEP_FOLDER TASK``: run one point of a Python sweep, as a job of
the sweep's width, and record what it returned (:mod:`ddpw.sweep.python`)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from ..files import write_atomically
from ..jobfolder import read_json
from . import folder as sweep_folder


def main(folder: Path, task: str) -> int:
    """Run point ``task`` of the sweep in ``folder``; return the exit status."""
    sys.path[:0] = [p for p in read_json(folder / "meta.json")["sys_path"] if p not in sys.path]
    import cloudpickle

    from ..shipping import dumps
    from ..wrapper import Wrapper

    fn, p_config, a_config, points = cloudpickle.loads((folder / "function.pkl").read_bytes())
    params = points[task]
    try:
        value = Wrapper(p_config, a_config).start(fn, **params)
    except Exception as error:
        traceback.print_exc()
        said = f"{type(error).__name__}: {error}".splitlines()
        sweep_folder.update(folder, task, result={"error": said[0], "last_lines": said[-10:]})
        return 1
    write_atomically(sweep_folder.point_folder(folder, task) / "result.pkl", dumps(value)[0])
    sweep_folder.update(folder, task, result=sweep_folder.as_json(value))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
