"""The original ddpw: the package of that name on PyPI, as a peer where its features overlap with
ours, measured in the same run, the variants taking turns.

    python scripts/bench/original_ddpw.py [--repeats 5] [--quick]

The newest release that installs on this Python goes into a venv of its own
(``~/.cache/ddpw-bench/original-ddpw-venv``, or ``$DDPW_BENCH_CACHE/original-ddpw-venv``; made
once and reused: delete it to pick a newer release), with the same torch as ours. Its features
that overlap ours are running a function (a non-training task) through ``Wrapper.start``:

- 1 process, a plain function (the sum of 0 to 999): plain ``python`` calling it (the floor),
  the original's ``Wrapper.start`` on the CPU (the baseline), ours (``n_procs=1``).
- 2 CPU processes, one all-reduce: ours (as in the launch row); the original is first probed
  for what it does when asked for two processes. Its CPU platform runs one process whatever is
  asked, with no process group, and its GPU platform on a host without CUDA starts none, so it
  has no time here: its line has no values and says what the probe saw.

Each run is a fresh process timed by :func:`common.run_command` (wall seconds, and the largest
peak RSS of any one process). If the original cannot be installed or run, its lines say why.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, Result, Run, interleave, row_main, with_ratios
from launch import PAYLOADS, print_table, timed

ROW = "original ddpw"
ONE = "1 process, a plain function"
TWO = "2 CPU processes, one all-reduce"
ORIGINAL = "original ddpw"
OURS = "ddpw Wrapper.start"
CACHE = Path(os.environ.get("DDPW_BENCH_CACHE", Path.home() / ".cache" / "ddpw-bench"))
VENV = CACHE / "original-ddpw-venv"
#: Written into the venv once it is complete: the original's version.
MARKER = "ddpw-bench.json"


def setup_original() -> tuple[Path | None, str]:
    """The Python of the original's venv and the original's version; or ``None`` and why not.

    The venv is made from the base interpreter of this Python, with this torch's release (a
    CPU build where one is at hand), then ``pip install ddpw`` picks the newest release that
    installs here. It is reused while its marker file says it is complete.
    """
    python = VENV / "bin" / "python"
    marker = VENV / MARKER
    if marker.is_file() and python.is_file():
        return python, json.loads(marker.read_text())["version"]
    torch = importlib.metadata.version("torch").split("+")[0]
    steps = [[PYTHON, "-m", "venv", "--clear", str(VENV)],
             [str(python), "-m", "pip", "install", "--quiet", f"torch=={torch}", "ddpw"]]
    print(f"installing the original ddpw into {VENV} ...", file=sys.stderr)
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"{' '.join(step[:4])} ...: {error}"
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            return None, f"{' '.join(step[:5])} ... failed: {tail}"
    # From the venv's folder: run from a checkout of ours, `-c` would import our ddpw.
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m, ddpw; "
                           "print(m.version('ddpw'))"], capture_output=True, text=True,
                          cwd=VENV)
    if done.returncode != 0:
        return None, f"the original ddpw does not import: {_last_line(done.stderr)}"
    version = done.stdout.strip()
    marker.write_text(json.dumps({"version": version, "torch": torch}))
    return python, version


def probe(python: Path, version: str) -> str:
    """What the original does when asked for two CPU processes, in words."""
    try:
        done = subprocess.run([str(python), str(PAYLOADS / "original_ddpw.py"), "probe",
                               "--version", version], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired:
        return "asked for two processes, the original hung (no end after 300 s)"
    if done.returncode != 0:
        return f"the probe failed: {_last_line(done.stderr)}"
    parts = []
    for found in json.loads(done.stdout.strip().splitlines()[-1]):
        asked = ", ".join(f"{k}={v!r}" for k, v in found["platform"].items())
        calls = found["calls_here"]
        text = (f"Platform({asked}): world_size {found.get('world_size')}, target called "
                f"{len(calls)} time(s) in the calling process")
        if calls:
            text += (f", process group: {calls[0]['process_group']}, all_reduce: "
                     f"{calls[0]['all_reduce']}")
        text += ("; start() returned without an error" if found["returned"]
                 else f"; start() raised {found.get('error')}")
        parts.append(text)
    return "; ".join(parts)


def measure(repeats: int, quick: bool) -> list[Result]:
    """Both cases; ratios against the original's line of each."""
    python, version = setup_original()
    warmup = 0 if quick else 1
    wrapper = [PYTHON, str(PAYLOADS / "wrapper_start.py")]
    one: dict[str, tuple[list[str], dict[str, str]]] = {
        "python": ([PYTHON, str(PAYLOADS / "function.py")], {})}
    if python is not None:
        # No PYTHONPATH: the original's venv must see nothing of ours (the payload checks).
        one[ORIGINAL] = ([str(python), str(PAYLOADS / "original_ddpw.py"), "function",
                          "--version", version], {"PYTHONPATH": ""})
    one[OURS] = ([*wrapper, "--n-procs", "1", "--work", "function"], {})
    two = {OURS: ([*wrapper, "--n-procs", "2", "--work", "all-reduce"], {})}
    # The newest release that pip would install for this Python (later ones may need a newer).
    original_extra: dict[str, Any] = {"version": version if python else None,
                                      "python": platform.python_version()}
    if python is None:
        print(f"the original ddpw cannot run: {version}", file=sys.stderr)
        original_extra["note"] = f"not measured: {version}"
    results = []
    for case, commands in ((ONE, one), (TWO, two)):
        outcomes = interleave({name: _runner(command, env)
                               for name, (command, env) in commands.items()}, repeats, warmup)
        for name, (runs, failed) in outcomes.items():
            extra = dict(original_extra) if name == ORIGINAL else {}
            if name == OURS:
                extra["version"] = importlib.metadata.version("ddpw")
            results.append(_result(case, name, runs, failed, extra))
        if python is None or case == TWO:
            # The original has no time of its own here: say why instead.
            extra = dict(original_extra)
            if python is not None:
                extra["note"] = ("not measured: it runs no two-process job here; asked for "
                                 "one, " + probe(python, version))
            results.append(_result(case, ORIGINAL, [], repeats, extra))
    results = with_ratios(results)
    for r in results:
        if r.ratio is not None and math.isnan(r.ratio):
            r.ratio = None  # against a baseline without values (with_ratios gives NaN)
    return results


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _runner(command: list[str], env: dict[str, str]) -> Callable[[], Run]:
    return lambda: timed(command, env, limit_s=300)


def _result(case: str, variant: str, runs: list[Run], failed: int,
            extra: dict[str, Any]) -> Result:
    return Result(row=ROW, case=case, variant=variant, metric="s",
                  values=[r.seconds for r in runs], baseline=ORIGINAL, failed=failed,
                  peak_rss_mb=max((r.peak_rss_mb for r in runs), default=None), extra=extra)


if __name__ == "__main__":
    row_main(measure, print_table, __doc__, repeats=5, quick_help="no warm-up runs")
