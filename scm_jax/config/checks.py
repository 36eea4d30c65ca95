"""The checks config validation is built from (``scm_jax.config.validate``): each maps a value
to what is wrong with it (one phrase) or None, and :class:`ConfigError` carries every problem found.

A new section's table (``validate.register_section``) is written with these constructors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from scm_jax.sharding import check_rules

Check = Callable[[Any], "str | None"]  # value -> what is wrong with it, or None


class ConfigError(ValueError):
    """A config that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems in the config:\n  " + "\n  ".join(self.problems)
        super().__init__(text)


# ------------------------------------------------------------------------------------- checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An int (not a bool) in [lo, hi]."""

    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an integer, not {type(v).__name__}"
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None

    return check


def real(
    gt: float | None = None, ge: float | None = None, lt: float | None = None,
    le: float | None = None,
) -> Check:  # fmt: skip
    """A finite number with the given bounds (> gt, >= ge, < lt, <= le)."""

    def check(v: Any) -> str | None:
        if not _is_real(v):
            return f"must be a number, not {type(v).__name__}"
        if not math.isfinite(v):
            return "must be finite"
        lo = (gt is not None and v <= gt) or (ge is not None and v < ge)
        if lo or (lt is not None and v >= lt) or (le is not None and v > le):
            left = f"> {gt:g}" if gt is not None else f">= {ge:g}" if ge is not None else ""
            right = f"< {lt:g}" if lt is not None else f"<= {le:g}" if le is not None else ""
            return "must be " + " and ".join(p for p in (left, right) if p)
        return None

    return check


def boolean() -> Check:
    """True or False."""
    return lambda v: None if isinstance(v, bool) else f"must be True or False, not {v!r}"


def text() -> Check:
    """A string (paths and names)."""
    return lambda v: None if isinstance(v, str) else f"must be a string, not {type(v).__name__}"


def one_of(choices: Iterable[Any] | Callable[[], Iterable[Any]]) -> Check:
    """One of ``choices`` (a callable is read at check time: lists other modules extend)."""

    def check(v: Any) -> str | None:
        options = tuple(choices() if callable(choices) else choices)
        return None if v in options else f"must be one of {', '.join(map(repr, options))}"

    return check


def sequence(item: Check, *, nonempty: bool = False) -> Check:
    """A list or tuple whose items pass ``item``."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list | tuple):
            return f"must be a list or tuple, not {type(v).__name__}"
        if nonempty and not v:
            return "must not be empty"
        bad = [(i, msg) for i, x in enumerate(v) if (msg := item(x))]
        return f"item {bad[0][0]} {bad[0][1]}" if bad else None

    return check


def mesh_size() -> Check:
    """A mesh axis size: >= 1, or -1 to fill with the remaining devices."""
    return lambda v: None if _is_int(v) and (v >= 1 or v == -1) else "must be an integer >= 1 or -1"


def sharding_rules() -> Check:
    """``(logical name, mesh axes)`` pairs (``scm_jax.sharding.check_rules``)."""

    def check(v: Any) -> str | None:
        try:
            check_rules(v)
        except (ValueError, TypeError) as e:
            return str(e)
        return None

    return check
