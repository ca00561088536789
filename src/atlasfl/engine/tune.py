"""Tuning a method on validation rows: ``atlasfl tune``, successive halving over rounds.

The candidates are a grid (``key=v1,v2,...``) or random draws (``key=log:1e-4:1e-2``,
``key=uniform:0:1``, or a list, drawn from). Every candidate runs, for every seed, to the first
rung (a round); the ``1/eta`` best on the mean validation metric at that round go on to the
next rung, and so on up to ``federation.rounds`` (successive halving; Jamieson & Talwalkar 2016,
the synchronous core of Hyperband and ASHA). A candidate goes on from its checkpoint, so its
rounds are those of one uninterrupted run (exact resume), and a candidate that reaches the
last rung is the run a sweep would have made of it. The choice is the best candidate at the
last rung on validation. Test metrics are computed by the runs (they are the runs of a sweep)
and never read here: ``rung_score`` reads ``val_metric`` only.

Every trial evaluates at every rung (``federation.eval_every`` is set to the rungs' greatest
common divisor), so the trials are the runs of that config, not of one evaluating less often;
training does not depend on when it is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from atlasfl.config import from_dict, layered
from atlasfl.engine.checkpoint import META, latest_checkpoint
from atlasfl.engine.grid import (GridJob, GridProgress, Point, cartesian, expand_grid,
                                 folder_state, plan_grid, point_name, run_jobs)
from atlasfl.engine.simulation import StopFlag
from atlasfl.errors import AtlasError
from atlasfl.runfiles import ROUNDS_FILE, SUMMARY_FILE

SEARCHERS = ("grid", "random")


def parse_space(items: Sequence[str]) -> list[tuple[str, list[Any] | tuple[str, float, float]]]:
    """``key=v1,v2`` (values) or ``key=log:LO:HI`` / ``key=uniform:LO:HI`` (a range)."""
    axes: list[tuple[str, list[Any] | tuple[str, float, float]]] = []
    for item in items:
        key, _, text = item.partition("=")
        key, text = key.strip(), text.strip()
        kind = text.split(":", 1)[0]
        if kind in ("log", "uniform"):
            parts = text.split(":")
            try:
                low, high = float(parts[1]), float(parts[2])
                if len(parts) != 3 or not low < high or (kind == "log" and low <= 0):
                    raise ValueError
            except (ValueError, IndexError):
                raise AtlasError(f"--space {key}: {text!r}; allowed: {kind}:LOW:HIGH with "
                                 f"LOW < HIGH{' and LOW > 0' if kind == 'log' else ''}") from None
            axes.append((key, (kind, low, high)))
        else:
            axes.append((key, [point[key] for point in expand_grid([item], "--space")]))
    return axes


def candidates(space: Sequence[tuple[str, list[Any] | tuple[str, float, float]]],
               searcher: str, trials: int = 0, seed: int = 0) -> list[Point]:
    """The settings to try: the grid of the values, or ``trials`` seeded random draws.

    A drawn number keeps 3 significant digits (``0.00123``), so run folders stay readable.
    """
    if searcher not in SEARCHERS:
        raise AtlasError(f"--searcher = {searcher!r}; allowed: {', '.join(SEARCHERS)}")
    if searcher == "grid":
        ranges = [key for key, values in space if isinstance(values, tuple)]
        if ranges:
            raise AtlasError(f"--space {ranges[0]}: a grid needs values (v1,v2,...), not a "
                             f"range; use --searcher random")
        return cartesian([(key, values) for key, values in space
                          if not isinstance(values, tuple)])
    if trials < 1:
        raise AtlasError(f"--trials = {trials}; allowed: 1 or more with --searcher random")
    rng = np.random.default_rng(seed)
    drawn: list[Point] = []
    for _ in range(trials):
        point: Point = {}
        for key, values in space:
            if isinstance(values, tuple):
                kind, low, high = values
                x = (math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "log"
                     else rng.uniform(low, high))
                point[key] = float(f"{x:.3g}")
            else:
                point[key] = values[int(rng.integers(len(values)))]
        drawn.append(point)
    return drawn


def halving_rungs(rounds: int, first: int, eta: int) -> list[int]:
    """The rounds at which candidates are compared: ``first * eta**k`` below ``rounds``, then it.

    ``halving_rungs(9, 1, 3) == [1, 3, 9]``; ``halving_rungs(5, 1, 3) == [1, 3, 5]``.
    """
    if first < 1 or eta < 2:
        raise AtlasError(f"--first-rung = {first}, --eta = {eta}; allowed: >= 1 and >= 2")
    rungs, r = [], first
    while r < rounds:
        rungs.append(r)
        r *= eta
    return [*rungs, rounds]


def survivors(scores: Sequence[float | None], eta: int) -> list[int]:
    """Indices of the ``ceil(n / eta)`` best scores (first on ties); unscored ones never go on."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    keep = max(1, math.ceil(len(scores) / eta))
    return sorted(sorted(scored, key=lambda i: -scores[i])[:keep])  # type: ignore[operator]


def rung_score(rows: Sequence[dict[str, Any]]) -> float | None:
    """The mean over tasks of the clients' mean validation metric, None when a client has none.

    One evaluation's ``average.val_metric`` as the run's summary computes it.
    """
    by_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("val_metric") is None:
            return None
        by_task[row["task"]].append(row["val_metric"])
    if not by_task:
        return None
    return float(np.mean([np.mean(v) for v in by_task.values()]))


def rows_of_round(path: Path, round_idx: int) -> list[dict[str, Any]]:
    """A run folder's client rows of one round (the last written per client)."""
    rows: dict[int, dict[str, Any]] = {}
    file = path / ROUNDS_FILE
    for line in file.read_text().splitlines() if file.is_file() else []:
        row = json.loads(line)
        if row.get("round") == round_idx:
            rows[row["client"]] = row
    return list(rows.values())


def process_seconds(path: Path) -> float:
    """The CPU seconds a run folder's sessions spent.

    Its summary's count, or its latest checkpoint's while it is unfinished.
    """
    if (path / SUMMARY_FILE).is_file():
        return float(json.loads((path / SUMMARY_FILE).read_text())["process_seconds"])
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        return 0.0
    return float(json.loads((checkpoint / META).read_text())["elapsed"]["process"])


def _seed_score(path: Path, rung: int) -> float | None:
    """A run's validation score at ``rung``.

    A run that stopped early on validation (``federation.patience``) before the rung is scored
    by what its summary reports.
    """
    rows = rows_of_round(path, rung)
    if rows:
        return rung_score(rows)
    if (path / SUMMARY_FILE).is_file():
        return json.loads((path / SUMMARY_FILE).read_text())["average"].get("val_metric")
    return None


@dataclass
class Trial:
    """One candidate: its setting and its score (mean over seeds) at each rung it reached."""

    setting: Point
    scores: list[float | None] = dataclasses.field(default_factory=list)


@dataclass
class TuneResult:
    """What a search ran and chose."""

    trials: list[Trial]
    rungs: list[int]
    chosen: Point | None  # the best at the last rung, on validation
    rounds_run: int  # rounds run over all candidates and seeds (the last rung each reached)
    rounds_full: int  # rounds a full grid of the same candidates and seeds runs
    process_seconds: float  # CPU seconds of every trial's sessions


def run_tune(raw: dict[str, Any], settings: Sequence[Point], seeds: Sequence[int], out: Path, *,
             first: int = 1, eta: int = 3, fixed: Point | None = None,
             stop: StopFlag | None = None, jobs: int = 1, ray: str | None = None,
             gather: bool = False) -> TuneResult | None:
    """Successive halving of ``settings`` over rounds; None when stopped before the end.

    Every candidate and seed is checked before anything runs (``plan_grid``). A call after an
    interrupted one goes on from the trials' checkpoints.
    """
    base = from_dict(layered(raw, fixed or {}))
    rungs = halving_rungs(base.federation.rounds, first, eta)
    fixed = {**(fixed or {}), "federation.eval_every": math.gcd(*rungs)}
    checked = plan_grid(raw, [{**s, "seed": seed} for s in settings for seed in seeds], out,
                        fixed=fixed)
    trials = [Trial(dict(s)) for s in settings]
    alive = list(range(len(settings)))
    for k, rung in enumerate(rungs):
        planned = [folder_state(job.index, job.point, job.cfg, job.path)  # as it stands now
                   for i in alive for job in checked[i * len(seeds):(i + 1) * len(seeds)]]
        todo = []
        for job in planned:
            reached = job.cfg.federation.rounds if job.state == "finished" else job.resume_round
            if reached < rung:
                todo.append(dataclasses.replace(job, until=0 if rung == rungs[-1] else rung))
        print(f"atlasfl tune: rung {k + 1} of {len(rungs)}: {len(alive)} candidates x "
              f"{len(seeds)} seeds to round {rung}", file=sys.stderr)
        if not _run(todo, jobs, ray, gather, stop):
            return None
        for n, i in enumerate(alive):
            per_seed = [_seed_score(job.path, rung)
                        for job in planned[n * len(seeds):(n + 1) * len(seeds)]]
            scored = [v for v in per_seed if v is not None]
            trials[i].scores.append(float(np.mean(scored)) if len(scored) == len(per_seed)
                                    else None)
        if k < len(rungs) - 1:
            alive = [alive[j] for j in survivors([trials[i].scores[-1] for i in alive], eta)]
    last = [trials[i].scores[-1] for i in alive]
    best = survivors(last, len(last))  # keeps one: the best, first on ties
    chosen = trials[alive[best[0]]].setting if best and last[best[0]] is not None else None
    seconds = sum(process_seconds(out / point_name({**s, "seed": seed}))
                  for s in settings for seed in seeds)
    reached = sum(rungs[len(t.scores) - 1] for t in trials if t.scores) * len(seeds)
    return TuneResult(trials, rungs, chosen, reached,
                      base.federation.rounds * len(settings) * len(seeds), seconds)


def _run(todo: list[GridJob], jobs: int, ray: str | None, gather: bool,
         stop: StopFlag | None) -> bool:
    """Run the jobs to their rung; False when a stop request ended them early."""
    progress = GridProgress(todo, jobs, "tune", paused="at its rung")
    run_jobs(todo, progress, jobs=jobs, ray=ray, gather=gather, stop=stop, halt_on_pause=False)
    return not (stop is not None and stop.requested)


def tune_report(result: TuneResult, method: str, seeds: Sequence[int], eta: int
                ) -> tuple[str, str]:
    """(Markdown table of the candidates' validation scores per rung, chosen.yaml's text)."""
    keys = list(result.trials[0].setting) if result.trials else []
    header = [*keys, *(f"val at round {r}" for r in result.rungs), "chosen"]
    rows = []
    for trial in result.trials:
        scores = [f"{v:.4f}" if v is not None else "unscored" for v in trial.scores]
        scores += ["pruned"] * (len(result.rungs) - len(scores))
        mark = "yes" if trial.setting == result.chosen else ""
        rows.append([*(str(trial.setting[k]) for k in keys), *scores, mark])
    share = result.rounds_run / result.rounds_full if result.rounds_full else 0.0
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(r) + " |" for r in rows), "",
             f"Successive halving (eta {eta}) on the mean validation metric over seeds "
             f"{', '.join(map(str, seeds))}; rungs at rounds "
             f"{', '.join(map(str, result.rungs))}. Rounds run: {result.rounds_run} of the "
             f"{result.rounds_full} a full grid of these candidates runs ({share:.0%}); "
             f"{result.process_seconds:.0f} CPU-s. Test metrics were not read."]
    chosen = {} if result.chosen is None else dict(result.chosen)
    fragment = (f"# atlasfl tune: chosen for {method} on validation rows (seeds "
                f"{', '.join(map(str, seeds))}), successive halving, eta {eta}\n"
                + yaml.safe_dump({"method_settings": {method: chosen}}, sort_keys=False))
    return "\n".join(lines), fragment
