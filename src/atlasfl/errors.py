"""User-facing errors: raised at boundaries, turned into exit code 2 by the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AtlasError(ValueError):
    """An error the user can act on: bad config, bad data file, unknown name."""


def unknown_name(kind: str, value: str, allowed: Iterable[str]) -> AtlasError:
    """Build an error for a name that is not one of ``allowed``, listing close matches."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return AtlasError(f"unknown {kind} {value!r}{hint} (allowed: {', '.join(allowed)})")
