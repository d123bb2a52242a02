"""Field checks shared by the configuration dataclasses.

Each check raises :class:`~ddpw.errors.ConfigError` with the same three parts: which field, what
was given, and what would be valid.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def fail(owner: str, field: str, value: Any, valid: str) -> None:
    """Raise a :class:`ConfigError` for ``owner.field``."""
    shown = repr(value)
    if "\n" in shown or len(shown) > 120:  # a model's or an optimiser's repr: many lines
        shown = f"<{type(value).__name__}>"
    raise ConfigError(f"{owner}.{field}={shown} is not valid: {valid}.")


def check_int(owner: str, field: str, value: Any, minimum: int, *, optional: bool = False,
              maximum: int | None = None) -> None:
    """Require an ``int`` (not a ``bool``) in ``[minimum, maximum]``, or ``None`` if optional."""
    if value is None and optional:
        return
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if in_range and maximum is not None:
        in_range = value <= maximum
    if not in_range:
        bound = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        fail(owner, field, value, bound + (" or None" if optional else ""))


def check_choice(owner: str, field: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Require ``value`` to be one of ``choices``."""
    if value not in choices:
        fail(owner, field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_type(owner: str, field: str, value: Any, kind: type | tuple[type, ...],
               what: str) -> None:
    """Require ``isinstance(value, kind)``; ``what`` describes the kind in the message."""
    if not isinstance(value, kind):
        fail(owner, field, value, what)
