"""Mutation score of the last `mutmut run`: killed / total per module and overall, and survivors.

Reads the results mutmut keeps beside the mutated copies (``mutants/<path>.meta``) for the files
listed in ``[tool.mutmut] only_mutate`` of pyproject.toml, so a module added there is reported
without touching this script. Status names are mutmut's own (``mutmut.stats``); "killed" counts
kills by a test (mutmut's exit codes 1 and 3) and by the type checker when one is configured.

    python bench/mutation_score.py            # after `mutmut run` (or `make mutation`)
    mutmut show <name>                        # the diff of one survivor
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "caught by type check"}
COLUMNS = ("killed", "survived", "timeout", "no tests", "other", "total")


def _modules(root: Path) -> list[str]:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def _status(exit_code: int | None) -> str:
    status = status_by_exit_code[exit_code]
    if status in KILLED:
        return "killed"
    return status if status in COLUMNS else "other"


def main(root: Path = Path(".")) -> int:
    """Print the table and the survivors; exit code 1 when there are no results yet."""
    rows: dict[str, Counter] = {}
    survivors: list[tuple[str, str]] = []
    for module in _modules(root):
        meta = root / "mutants" / f"{module}.meta"
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(_status(code) for code in codes.values())
        counts["total"] = len(codes)
        rows[module] = counts
        survivors += [(name, status_by_exit_code[code]) for name, code in sorted(codes.items())
                      if _status(code) != "killed"]
    if not rows:
        print("no mutation results: run `make mutation` (or `mutmut run`) first")
        return 1
    overall = sum(rows.values(), Counter())
    width = max(len(m) for m in rows) + 2
    print(f"{'module':<{width}}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'score':>10}")
    for name, counts in [*rows.items(), ("overall", overall)]:
        score = counts["killed"] / counts["total"] if counts["total"] else 0.0
        print(f"{name:<{width}}" + "".join(f"{counts[c]:>10}" for c in COLUMNS)
              + f"{score:>10.1%}")
    print(f"\nmutation score: {overall['killed']} / {overall['total']} killed "
          f"({overall['killed'] / overall['total']:.1%})")
    if survivors:
        print(f"\n{len(survivors)} not killed (`mutmut show <name>` prints the diff):")
        for name, status in survivors:
            print(f"    {name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
