"""``import ddpw`` stays light: its public names load when first used (PEP 562), and what runs
before any job does (``ddpw-launch --help``, ``--dry-run``, a SLURM node on its way to
``accelerate launch``) never imports torch.

Each check runs in a clean interpreter, which reports every module it imports
(``PYTHONPROFILEIMPORTTIME``, as ``python -X importtime`` does, the console script included).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ddpw
from ddpw.plan import gpu_driver_present

#: The installed command (a console script, which python's -X options cannot reach).
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("ddpw-launch"))


def imported(command: list[str], cwd: Path | None = None) -> set[str]:
    """The modules that ``command``, a Python program, imports before it ends.

    One imported through :func:`importlib.import_module` is not reported itself (as
    ``ddpw.__getattr__`` loads the public names), but the modules it imports in turn are.
    """
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return set(re.findall(r"^import time:.*\|\s*(\S+)$", done.stderr, re.MULTILINE))


def torch_in(modules: set[str]) -> bool:
    """Whether torch was imported: itself, or any of its modules."""
    return any(name == "torch" or name.startswith("torch.") for name in modules)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_check_sees_torch_when_a_public_name_needs_it():
    """The checks below can fail: loading the Trainer imports torch."""
    modules = imported(python("from ddpw import Trainer"))
    assert {"ddpw.vote", "torch"} <= modules  # what ddpw.trainer imports (see imported())
    assert torch_in(modules)


@pytest.mark.parametrize("code", ["import ddpw", "import ddpw.cli", "import ddpw.slurm.node",
                                  "from ddpw import ConfigError, JobPaused, WorkerError, "
                                  "Platform, PlatformConfig, World, restartable, world",
                                  "from ddpw import JobConfig, JobMode"])
def test_importing_does_not_import_torch(code):
    """``ddpw.slurm.node`` is what submitit unpickles on a SLURM node before ``accelerate
    launch``; the rest is what the command line and a script's first lines import."""
    modules = imported(python(code))
    assert "ddpw" in modules
    assert not torch_in(modules)


def test_ddpw_launch_help_does_not_import_torch():
    modules = imported([CONSOLE_SCRIPT, "--help"])
    assert "ddpw.cli" in modules
    assert not torch_in(modules)


def test_ddpw_launch_dry_run_imports_torch_only_to_count_gpus(tmp_path):
    """Where there is no GPU driver, the plan is made without torch; where there is one, torch
    counts the devices."""
    (tmp_path / "x.py").write_text("")
    modules = imported([CONSOLE_SCRIPT, "--platform", "cpu", "--n-procs", "2", "--dry-run",
                        "x.py"], cwd=tmp_path)
    assert "ddpw.plan" in modules
    assert torch_in(modules) is gpu_driver_present()


def test_the_public_names_are_the_seeds_and_load_from_their_modules():
    assert ddpw.__all__ == ["ArtefactsConfig", "ConfigError", "JobConfig", "JobHung", "JobMode",
                            "JobPaused", "Platform", "PlatformConfig", "Trainer", "WorkerError",
                            "World", "Wrapper", "__version__", "heartbeat", "restartable",
                            "world"]
    for name in ddpw.__all__:
        value = getattr(ddpw, name)
        if name != "__version__":
            assert getattr(sys.modules[value.__module__], name) is value
    assert set(ddpw.__all__) <= set(dir(ddpw))
    from ddpw import Wrapper
    from ddpw.platform import Platform, PlatformConfig
    from ddpw.wrapper import Wrapper as InItsModule

    assert Wrapper is InItsModule
    assert (ddpw.Platform, ddpw.PlatformConfig) == (Platform, PlatformConfig)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'ddpw' has no attribute 'Wraper'"):
        ddpw.Wraper  # noqa: B018
    assert not hasattr(ddpw, "Wraper")


def test_a_submodule_is_an_attribute_of_the_package_after_import_ddpw():
    """As when ``import ddpw`` loaded everything: ``ddpw.utils.world()`` (the README's
    spelling) and ``ddpw.checkpoint.latest`` need no import of their own."""
    done = subprocess.run(python("import ddpw; print(ddpw.utils.world.__module__, "
                                 "ddpw.checkpoint.latest.__name__, ddpw.slurm.ON_INTERRUPT)"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ddpw.utils", "latest", "('ask',", "'cancel',", "'keep')"]


def test_the_modules_of_ddpw_import_each_other_without_a_cycle():
    """Imports run downwards: no module of ddpw imports (at its top level) one that imports it
    back, directly or through others. (Imports inside functions and for type checkers only are
    left out: they run after every module has loaded.)"""
    import ast

    root = Path(ddpw.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
                if node.module:  # `from . import x` imports x, the package being loaded already
                    graph[name].add(target)
                graph[name] |= {f"{target}.{alias.name}" for alias in node.names}
    graph = {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for dep in graph[name]:
            if dep in path:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif not done.get(dep):
                visit(dep, [*path, dep])
        done[name] = True

    done: dict[str, bool] = {}
    for name in graph:
        visit(name, [name])
    assert not cycles, cycles
