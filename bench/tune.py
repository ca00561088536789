"""Every method tuned with the same small grid, chosen on validation rows only.

Each (method, grid point, seed) is a run folder under ``--out`` made by
``atlasfl.engine.grid.run_grid`` (a finished run is skipped, an interrupted one resumed), so the
grid fills over several sessions and parallel shards (``--shard i/n``; one thread each:
OMP_NUM_THREADS=1). A method runs with the config's ``method_settings`` for it (centralized's
early stopping), then the grid point on top.

    python bench/tune.py run --config configs/quick.yaml --grid train.lr=0.0005,0.001,0.002 \
        --seeds 0 --shard 0/2
    python bench/tune.py choose --config configs/quick.yaml --grid train.lr=0.0005,0.001,0.002

``choose`` prints, per method, the validation metric of every point and the one chosen
(``atlasfl.engine.grid.choose_on_validation``: the mean over seeds of the validation metric,
nothing else), then the test metrics of the chosen point and of the others as "reported, not
used to choose", writes the rows to ``--rows`` (JSON lines) and prints the ``method_settings``
block to paste into the config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config import from_yaml, parse_overrides
from atlasfl.engine.grid import choose_on_validation, expand_grid, point_name, run_grid
from atlasfl.strategies import STRATEGIES


def _points(args: argparse.Namespace) -> list[dict[str, Any]]:
    methods = list(STRATEGIES) if args.methods == ["all"] else args.methods
    return [{"method": m, **g, "seed": s} for m in methods for g in expand_grid(args.grid)
            for s in args.seeds]


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    return {**parse_overrides(args.set), "progress": False}


def cmd_run(args: argparse.Namespace) -> None:
    index, count = map(int, args.shard.split("/"))
    points = _points(args)[index::count]
    run_grid(from_yaml(args.config), points, Path(args.out), fixed=_fixed(args))


def cmd_choose(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    for point in _points(args):
        path = out / point_name(point)
        summary = (json.loads((path / "summary.json").read_text())
                   if (path / "summary.json").is_file() else None)
        avg = summary["average"] if summary else {}
        rows.append({"point": point, "val_metric": avg.get("val_metric"),
                     "local_metric": avg.get("local_metric"),
                     "global_metric": avg.get("global_metric"),
                     "wall_seconds": summary["wall_seconds"] if summary else None,
                     "cpu_over_wall": summary["cpu_utilisation"] if summary else None})
    chosen: dict[str, dict[str, Any]] = {}
    print("| method | setting | val metric (chooses) | chosen | local test (reported) | "
          "global test (reported) | wall s |\n|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["point"]["method"] for r in rows):
        mine = [r for r in rows if r["point"]["method"] == method]
        # only (point, validation metric) pairs reach the choice
        pick = choose_on_validation([({k: v for k, v in r["point"].items() if k != "method"},
                                      r["val_metric"]) for r in mine])
        if pick is not None:
            chosen[method] = pick
        for r in mine:
            setting = {k: v for k, v in r["point"].items() if k not in ("method", "seed")}
            mark = "**yes**" if setting == pick else ""
            r["chosen"] = bool(mark)
            print(f"| {method} | {_text(setting)} seed {r['point']['seed']} | "
                  f"{_num(r['val_metric'])} | {mark} | {_num(r['local_metric'])} | "
                  f"{_num(r['global_metric'])} | {_num(r['wall_seconds'], 0)} |")
    if args.rows:
        with open(args.rows, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    missing = [point_name(r["point"]) for r in rows if r["val_metric"] is None]
    if missing:
        print(f"\nnot finished ({len(missing)}): {', '.join(missing)}", file=sys.stderr)
    print("\nmethod_settings chosen on validation (merge into the config):")
    print(yaml.safe_dump({"method_settings": chosen}, sort_keys=False, width=100))


def _text(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "choose"])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis (the same for every method)")
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of every run (after method_settings)")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", default="runs/tune-quick")
    parser.add_argument("--rows", help="write the rows (JSON lines) here (choose)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    {"run": cmd_run, "choose": cmd_choose}[args.command](args)


if __name__ == "__main__":
    main()
