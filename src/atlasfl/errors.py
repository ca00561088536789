"""User-facing errors: raised at boundaries, turned into exit code 2 by the CLI."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from typing import Any


class AtlasError(ValueError):
    """An error the user can act on: bad config, bad data file, unknown name."""


def unknown_name(kind: str, value: str, allowed: Iterable[str]) -> AtlasError:
    """Build an error for a name that is not one of ``allowed``, listing close matches."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return AtlasError(f"unknown {kind} {value!r}{hint} (allowed: {', '.join(allowed)})")


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` choice (``atlasfl.types``)."""
    return typing.get_args(literal)


def check_choice(key: str, value: object, literal: Any) -> None:
    """Raise naming ``key``, ``value`` and the allowed values when ``value`` is not one of them."""
    allowed = choices(literal)
    if value not in allowed:
        raise AtlasError(f"{key} = {value!r} is invalid; allowed: {', '.join(allowed)}")
