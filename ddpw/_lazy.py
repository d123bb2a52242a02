"""Names of a package loaded from its modules on first use (:pep:`562`).

``import ddpw`` must stay light (no torch) for ``ddpw-launch --help`` and a SLURM node's task,
while ``from ddpw import Wrapper`` and ``ddpw.utils.world()`` keep working: each package's
``__init__`` names where its public names live, and these functions load them when asked.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, homes: dict[str, str], public: list[str]
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    :param homes: the submodule (relative to ``package``) that defines each public name.
    :param public: the package's ``__all__``.

    A name is loaded from its home, or else taken as a submodule (``ddpw.utils``), and kept in
    the package, so that later look-ups find it without coming here.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is not None:
            value = getattr(importlib.import_module(f".{home}", package), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__
