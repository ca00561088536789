"""The grid commands: ``atlasfl sweep``, ``compare`` and ``tune``.

Every grid is checked whole before its first run (``atlasfl.engine.grid.plan_grid``); its
points run one after another here, ``--jobs N`` at once in processes, or on a Ray cluster.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlasfl.cli.stopping import install_stop_handlers
from atlasfl.errors import AtlasError


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """How a grid's points run: progress bars, --jobs, --ray."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="points run at once, each in its own process with an equal share "
                        "of the cores as torch threads (default 1: one after another, in this "
                        "process); every point is checked before the first starts")
    parser.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                        help="run the points as tasks on a running Ray cluster (ray start "
                        "--head; default address auto); --out must be a path every node sees, "
                        "unless --gather")
    parser.add_argument("--gather", action="store_true",
                        help="with --ray, for nodes that share no file system: each point runs "
                        "in a folder on its node ($ATLASFL_SCRATCH, default the temp folder) "
                        "and its checkpoints and finished folder are copied to --out here, so "
                        "a point lost with its node resumes elsewhere from its last checkpoint")


def _ray(args: argparse.Namespace) -> str | None:
    if args.gather and args.ray is None:
        raise AtlasError("--gather copies run folders from the nodes of a Ray cluster; it needs "
                         "--ray")
    address: str | None = args.ray
    return address


def _jobs(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise AtlasError(f"--jobs = {args.jobs}; allowed: 1 or more")
    return int(args.jobs)


def add_grid_commands(sub: Any) -> None:
    """The sweep, compare and tune subparsers."""
    sweep = sub.add_parser("sweep", help="run a grid of settings into one folder and tabulate",
                           description="Runs every combination of the --set values (comma-"
                           "separated) into OUT/<point>, skipping finished runs and resuming "
                           "interrupted ones, then writes OUT/sweep.md and OUT/sweep.csv. Choose "
                           "settings on the validation column; the test columns are reported.")
    sweep.add_argument("--config", help="YAML config file (configs/quick.yaml, ...)")
    sweep.add_argument("--method", help="the method of every run (default: the config's)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a grid axis, e.g. --set laplacian.lam=0,0.01,0.1,1")
    sweep.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                       help="a setting applied to every run (a single value)")
    sweep.add_argument("--out", required=True, help="the sweep's folder")
    _run_flags(sweep)
    compare = sub.add_parser(
        "compare", help="run methods x seeds into one folder, then report",
        description="Runs every method with every seed into OUT/method=M_seed=S (a finished run "
        "is skipped, an interrupted one resumed), then writes the report of OUT (as atlasfl "
        "report).")
    compare.add_argument("--config", help="YAML config file (configs/quick.yaml, ...)")
    compare.add_argument("--methods", required=True, help="comma-separated, e.g. local,atlas")
    compare.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a setting for every run, e.g. --set data.partition=dirichlet")
    compare.add_argument("--out", required=True, help="the comparison's folder")
    compare.add_argument("--vs", help="the method the others are paired against "
                         "(default atlas when present)")
    _run_flags(compare)
    tune = sub.add_parser(
        "tune", help="choose a method's settings on validation, pruning poor candidates",
        description="Successive halving over rounds: every candidate runs to the first rung, "
        "the best 1/ETA on the mean validation metric go on to the next, up to "
        "federation.rounds. Writes OUT/tune.md and OUT/chosen.yaml (method_settings for the "
        "method, to paste into a config). Test metrics are never read.")
    tune.add_argument("--config", help="YAML config file (configs/quick.yaml, ...)")
    tune.add_argument("--method", help="the method to tune (default: the config's)")
    tune.add_argument("--space", action="append", required=True, metavar="KEY=SPEC",
                      help="values (train.lr=0.0005,0.001,0.002) or, with --searcher random, "
                      "a range: log:LOW:HIGH or uniform:LOW:HIGH")
    tune.add_argument("--searcher", default="grid", help="grid (default) or random")
    tune.add_argument("--trials", type=int, default=0, help="candidates drawn (random)")
    tune.add_argument("--search-seed", type=int, default=0, help="seed of the draws (random)")
    tune.add_argument("--seeds", default="0", help="run seeds each candidate is scored over, "
                      "comma-separated (default 0)")
    tune.add_argument("--first-rung", type=int, default=1, help="round of the first comparison")
    tune.add_argument("--eta", type=int, default=3, help="1/ETA of the candidates go on")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a setting for every trial")
    tune.add_argument("--out", required=True, help="the search's folder")
    _run_flags(tune)


def _base(args: argparse.Namespace, settings: list[str]) -> tuple[dict, dict]:
    """The config file's dict, and the settings of every point (``--method`` among them)."""
    from atlasfl.config import from_yaml, parse_overrides

    raw = from_yaml(args.config) if args.config else {}
    fixed = parse_overrides(settings)
    if getattr(args, "method", None):
        fixed["method"] = args.method
    if args.no_progress:
        fixed["progress"] = False
    return raw, fixed


def _cmd_sweep(args: argparse.Namespace) -> int:
    from atlasfl.engine.grid import expand_grid, grid_table, run_grid

    raw, fixed = _base(args, args.fixed)
    points = expand_grid(args.set)
    out = Path(args.out)
    stop = install_stop_handlers()
    results = run_grid(raw, points, out, fixed=fixed, stop=stop, jobs=_jobs(args),
                       ray=_ray(args), gather=args.gather)
    markdown, table = grid_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(markdown + "\n")
    (out / "sweep.csv").write_text(table)
    print(markdown)
    print(f"\n{out / 'sweep.md'}, {out / 'sweep.csv'}")
    return 130 if stop.requested else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from atlasfl.engine.grid import run_grid
    from atlasfl.report import write_report

    raw, fixed = _base(args, args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = _seeds(args.seeds)
    points = [{"method": m, "seed": s} for m in methods for s in seeds]
    out = Path(args.out)
    stop = install_stop_handlers()
    run_grid(raw, points, out, fixed=fixed, stop=stop, jobs=_jobs(args), ray=_ray(args),
             gather=args.gather, name="compare")
    if stop.requested:
        return 130
    report_dir = out / "report"
    print(write_report([out], report_dir, vs=args.vs))
    print(f"report: {report_dir / 'report.md'}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AtlasError(f"--seeds expects integers separated by commas, got {text!r}"
                         ) from None


def _cmd_tune(args: argparse.Namespace) -> int:
    from atlasfl.config import from_dict, layered
    from atlasfl.engine.tune import candidates, parse_space, run_tune, tune_report

    raw, fixed = _base(args, args.set)
    method = from_dict(layered(raw, fixed)).method
    settings = candidates(parse_space(args.space), args.searcher, args.trials, args.search_seed)
    out = Path(args.out)
    stop = install_stop_handlers()
    result = run_tune(raw, settings, _seeds(args.seeds), out, first=args.first_rung,
                      eta=args.eta, fixed=fixed, stop=stop, jobs=_jobs(args), ray=_ray(args),
                      gather=args.gather)
    if result is None:
        print(f"atlasfl: stopped; continue with the same command (trials resume from {out})")
        return 130
    markdown, fragment = tune_report(result, method, _seeds(args.seeds), args.eta)
    (out / "tune.md").write_text(markdown + "\n")
    (out / "chosen.yaml").write_text(fragment)
    print(markdown)
    print(f"\n{out / 'tune.md'}, {out / 'chosen.yaml'}")
    return 0


GRID_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "sweep": _cmd_sweep, "compare": _cmd_compare, "tune": _cmd_tune}
