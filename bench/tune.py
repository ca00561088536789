"""Every method tuned with the same small grid, chosen on validation rows only.

Each (method, grid point, seed) is a run folder under ``--out`` made by
``atlasfl.engine.grid.run_grid`` (a finished run is skipped, an interrupted one resumed), so the
grid fills over several sessions and parallel shards (``--shard i/n``; one thread each:
OMP_NUM_THREADS=1). A method runs with the config's ``method_settings`` for it (centralized's
early stopping), then the grid point on top.

    python bench/tune.py run --config configs/quick.yaml --grid train.lr=0.0005,0.001,0.002 \
        --seeds 0 --shard 0/2
    python bench/tune.py choose --config configs/quick.yaml --grid train.lr=0.0005,0.001,0.002

    python bench/tune.py table --rows bench/results/tune_quick_iid.jsonl   # the README's table

``choose`` prints, per method, the table every sweep prints (``atlasfl.engine.grid.grid_table``:
the validation metric of every point, the one chosen on it by ``choose_on_validation``, the
test metrics "reported, not used to choose"), writes the rows to ``--rows`` (JSON lines) and
prints the ``method_settings`` block to paste into the config. ``table`` pivots committed rows
into one line per method (``--pivot``, the grid axis in the columns), choosing again from the
validation column alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config import from_yaml, parse_overrides
from atlasfl.engine.grid import (choose_on_validation, expand_grid, grid_table, point_name,
                                 run_grid)
from atlasfl.strategies import METHODS


def _points(args: argparse.Namespace) -> list[dict[str, Any]]:
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    return [{"method": m, **g, "seed": s} for m in methods for g in expand_grid(args.grid)
            for s in args.seeds]


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    return {**parse_overrides(args.set), "progress": False}


def cmd_run(args: argparse.Namespace) -> None:
    index, count = map(int, args.shard.split("/"))
    points = _points(args)[index::count]
    run_grid(from_yaml(args.config), points, Path(args.out), fixed=_fixed(args))


def cmd_choose(args: argparse.Namespace) -> None:
    """Per method, ``grid_table`` of its points (the choice made on validation only), then the
    method_settings block; ``--rows`` keeps one JSON line per point for ``table``."""
    out = Path(args.out)
    results: list[tuple[dict[str, Any], Path, dict[str, Any] | None]] = []
    for point in _points(args):
        path = out / point_name(point)
        results.append((point, path, json.loads((path / "summary.json").read_text())
                        if (path / "summary.json").is_file() else None))
    chosen: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for method in dict.fromkeys(point["method"] for point, _, _ in results):
        mine = [({k: v for k, v in point.items() if k != "method"}, path, summary)
                for point, path, summary in results if point["method"] == method]
        markdown, _ = grid_table(mine)  # the table and the choice every sweep makes
        print(f"\n`{method}`\n\n{markdown}")
        # only (point, validation metric) pairs reach the choice
        pick = choose_on_validation([(p, _average(s, "val_metric")) for p, _, s in mine])
        if pick is not None:
            chosen[method] = pick
        rows += [{"point": {"method": method, **p},
                  "chosen": pick is not None and {k: p[k] for k in pick} == pick,
                  **{key: _average(s, key) for key in ("val_metric", "local_metric",
                                                       "global_metric")},
                  "wall_seconds": s["wall_seconds"] if s else None,
                  "cpu_over_wall": s["cpu_utilisation"] if s else None}
                 for p, _, s in mine]
    if args.rows:
        with open(args.rows, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    missing = [point_name(r["point"]) for r in rows if r["val_metric"] is None]
    if missing:
        print(f"\nnot finished ({len(missing)}): {', '.join(missing)}", file=sys.stderr)
    print("\nmethod_settings chosen on validation (merge into the config):")
    print(yaml.safe_dump({"method_settings": chosen}, sort_keys=False, width=100))


def _average(summary: dict[str, Any] | None, key: str) -> float | None:
    return None if summary is None else summary["average"].get(key)


def cmd_table(args: argparse.Namespace) -> None:
    """The README's tuning table from rows that ``choose --rows`` wrote (committed)."""
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    print(pivot(rows, args.pivot))


def pivot(rows: list[dict[str, Any]], axis: str) -> str:
    """One line per method: the validation metric at each value of ``axis`` (mean over seeds),
    the value chosen on it, and the test metrics there (reported, not used to choose).

    The choice is made again here from the validation column alone
    (``choose_on_validation``), so a table cannot show a choice its rows do not support.
    """
    others = {k for r in rows for k in r["point"]} - {"method", "seed", axis}
    varied = sorted(k for k in others if len({str(r["point"].get(k)) for r in rows}) > 1)
    if varied:
        raise SystemExit(f"--pivot {axis}: the rows also vary {', '.join(varied)}; a table "
                         f"pivots a one-axis grid (choose prints every point)")
    values = sorted({r["point"][axis] for r in rows}, key=str)
    if all(isinstance(v, (int, float)) for v in values):
        values.sort()
    lines = ["| method | " + " | ".join(f"val, {_key(axis)} {_value(v)}" for v in values)
             + f" | chosen {_key(axis)} | local test at it (reported) "
             "| global test at it (reported) |",
             "|---" * (len(values) + 4) + "|"]
    for method in dict.fromkeys(r["point"]["method"] for r in rows):
        mine = [r for r in rows if r["point"]["method"] == method]
        pick = choose_on_validation([({k: v for k, v in r["point"].items() if k != "method"},
                                      r["val_metric"]) for r in mine])
        cells = []
        for value in values:
            val = _mean([r["val_metric"] for r in mine if r["point"][axis] == value])
            text = _num(val, 3)
            cells.append(f"**{text}**" if pick and pick.get(axis) == value else text)
        at = [r for r in mine if pick and r["point"][axis] == pick.get(axis)]
        tail = ([_value(pick[axis]), _num(_mean([r["local_metric"] for r in at]), 3),
                 _num(_mean([r["global_metric"] for r in at]), 3)] if pick else ["", "", ""])
        lines.append(f"| `{method}` | " + " | ".join(cells + tail) + " |")
    return "\n".join(lines)


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _key(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "choose", "table"])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis (the same for every method)")
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of every run (after method_settings)")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", default="runs/tune-quick")
    parser.add_argument("--rows", help="choose: write the rows (JSON lines) here; table: "
                        "read them from here")
    parser.add_argument("--pivot", default="train.lr",
                        help="table: the grid axis in the columns (default train.lr)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    {"run": cmd_run, "choose": cmd_choose, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
