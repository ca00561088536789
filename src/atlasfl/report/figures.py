"""Figures for a two-column paper from finished runs: 300-DPI PNG and vector PDF (matplotlib).

Each figure is drawn only from what the runs wrote; a figure whose data no run has is skipped
and ``draw_figures`` says why, it is never drawn from anything else. Colours are the Okabe-Ito
palette (safe for colour-blind readers), sized for one IEEE column (3.5 in) at 8 pt. Arms are
``atlasfl.report.tables.arms``: a method plus the settings that tell runs apart.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from atlasfl.report.runs import RunRecord
from atlasfl.report.tables import arms

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
             "#000000"]
MARKERS = "osD^vP*Xh"
COLUMN = 3.5  # inches: one IEEE column
STYLE: dict[str, Any] = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 6.5,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "pdf.fonttype": 42, "ps.fonttype": 42,
         "axes.spines.top": False, "axes.spines.right": False}

Drawer = Callable[[dict[str, list[RunRecord]]], "Figure | str"]


# the two scores every figure shows side by side: each client's own held-out rows, and the
# task's shared test rows (``atlasfl.summary``)
SIDES = (("local_metric", "local test (each client's own rows)"),
         ("global_metric", "global test (the task's shared rows)"))


def _figure(height: float = 2.4, width: float = COLUMN) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")  # no pyplot: no global state
    return fig, fig.subplots()


def _side_by_side(height: float = 2.8) -> tuple[Figure, Any]:
    """Two panels in a two-column-wide figure: local (left) and global (right)."""
    fig = Figure(figsize=(2 * COLUMN, height), layout="constrained")
    return fig, fig.subplots(1, 2)


def _colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _dashes(i: int) -> str:
    """Solid for the first eight arms, then dashed, dotted: no two arms look the same."""
    return ["-", "--", ":", "-."][(i // len(OKABE_ITO)) % 4]


def _hatch(i: int) -> str:
    return ["", "///", "...", "xx"][(i // len(OKABE_ITO)) % 4]


def _legend(ax: Any, count: int) -> None:
    """Below the axes, inside the figure, so it never covers data; two columns in one column."""
    wide = ax.figure.get_figwidth() > 1.5 * COLUMN
    ax.figure.legend(*ax.get_legend_handles_labels(), frameon=False, loc="outside lower center",
                     ncol=min(4 if wide else 2, max(1, count)))


def convergence(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Average local and global metric per evaluated round: mean over seeds, min-max band."""
    fig, axes = _side_by_side(3.4)
    drawn = 0
    for ax, (key, title) in zip(axes, SIDES, strict=True):
        drawn = 0
        for i, (label, runs) in enumerate(grouped.items()):
            curves = []
            for run in runs:
                by_round: dict[int, list[float]] = {}
                for row in run.rounds:
                    if key in row:
                        by_round.setdefault(row["round"], []).append(row[key])
                curves.append({r: statistics.fmean(v) for r, v in by_round.items()})
            rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not rounds:
                continue
            values = np.array([[c[r] for r in rounds] for c in curves])  # (seeds, rounds)
            ax.plot(rounds, values.mean(0), color=_colour(i), marker=MARKERS[i % len(MARKERS)],
                    linestyle=_dashes(i), markersize=3, linewidth=1,
                    label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(rounds, values.min(0), values.max(0), color=_colour(i),
                                alpha=0.15, linewidth=0)
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("average metric over clients")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not drawn:
        return "no run has evaluated rounds with local and global scores"
    _legend(axes[1], drawn)
    return fig


def task_bars(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Each task's local and global metric per arm: bars at the mean over seeds, one SD."""
    tasks = list(next(iter(grouped.values()))[0].summary["tasks"])  # type: ignore[index]
    fig, axes = _side_by_side(3.4)
    width = 0.8 / len(grouped)
    x = np.arange(len(tasks))
    for ax, (key, title) in zip(axes, SIDES, strict=True):
        for i, (label, runs) in enumerate(grouped.items()):
            values = np.array([[r.summary["tasks"][t].get(key, np.nan)  # type: ignore[index]
                                for t in tasks] for r in runs])
            sd = values.std(0, ddof=1) if len(runs) > 1 else None  # one seed: no error bar
            ax.bar(x + (i - (len(grouped) - 1) / 2) * width, values.mean(0), width, yerr=sd,
                   color=_colour(i), hatch=_hatch(i), edgecolor="white", linewidth=0.3,
                   label=f"{label} (n={len(runs)})", capsize=1.5, error_kw={"linewidth": 0.6})
        ax.set_xticks(x, tasks)
        ax.set_title(title)
        ax.set_ylabel("metric (mean ± SD over seeds)")
        ax.axhline(0, color="black", linewidth=0.5)
    _legend(axes[1], len(grouped))
    return fig


def _points(ax: Any, grouped: dict[str, list[RunRecord]],
            x_of: Callable[[dict[str, Any]], Any], y_of: Callable[[dict[str, Any]], Any]) -> int:
    """One point per arm at its mean over seeds, error bars one SD; returns the points drawn."""
    drawn = 0
    for i, (label, runs) in enumerate(grouped.items()):
        xs = [x_of(r.summary) for r in runs]  # type: ignore[arg-type]
        ys = [y_of(r.summary) for r in runs]  # type: ignore[arg-type]
        if any(v is None for v in [*xs, *ys]):
            continue
        ax.errorbar(statistics.fmean(xs), statistics.fmean(ys),
                    xerr=statistics.stdev(xs) if len(xs) > 1 else None,
                    yerr=statistics.stdev(ys) if len(ys) > 1 else None, fmt=MARKERS[i % 9],
                    color=_colour(i), markersize=4, capsize=1.5, label=label)
        drawn += 1
    return drawn


def _average_of(key: str, summary: dict[str, Any]) -> Any:
    return summary["average"].get(key)


def _scatter(grouped: dict[str, list[RunRecord]], x_of: Callable[[dict[str, Any]], Any],
             xlabel: str, missing: str) -> Figure | str:
    fig, axes = _side_by_side()
    drawn = 0
    for ax, (key, title) in zip(axes, SIDES, strict=True):
        drawn = _points(ax, grouped, x_of, functools.partial(_average_of, key))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average metric (mean ± SD over seeds)")
    if not drawn:
        return missing
    _legend(axes[1], drawn)
    return fig


def local_vs_global(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Each arm's average global metric against its average local metric (± SD over seeds)."""
    fig, ax = _figure(3.2)
    drawn = _points(ax, grouped, lambda s: s["average"].get("global_metric"),
                    lambda s: s["average"].get("local_metric"))
    if not drawn:
        return "no run has both local and global scores"
    ax.set_xlabel("average global metric (shared test rows)")
    ax.set_ylabel("average local metric (own rows)")
    _legend(ax, drawn)
    return fig


def bytes_vs_metric(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Communication (MB up + down over the run) against the average local and global metric."""
    return _scatter(grouped, lambda s: (s["bytes_up"] + s["bytes_down"]) / 1e6,
                    "MB sent and received (10^6 bytes)", "no run counted bytes")


def memory_vs_metric(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Peak memory of the run's process against the average local and global metric."""
    return _scatter(grouped, lambda s: s.get("peak_rss_mb"), "peak RSS (MB)",
                    "no run recorded its peak memory")


def _first_with(grouped: dict[str, list[RunRecord]], name: str) -> RunRecord | None:
    for runs in grouped.values():
        for run in runs:
            if name in run.files:
                return run
    return None


def fingerprint_map(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Clients' fingerprints in 2-D (PCA), colour by true task, marker by found cluster."""
    run = _first_with(grouped, "clusters.json")
    if run is None:
        return "no run wrote clusters.json (fingerprints: methods that cluster)"
    doc = run.files["clusters.json"]
    points = np.asarray(doc["fingerprints"], dtype=float)  # (clients, dim)
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T  # (clients, 2)
    tasks = sorted(set(doc["tasks"]))
    fig, ax = _figure(3.2)
    for task_idx, task in enumerate(tasks):
        for cluster in sorted(set(doc["labels"])):
            rows = [i for i, (t, c) in enumerate(zip(doc["tasks"], doc["labels"], strict=True))
                    if t == task and c == cluster]
            if rows:
                ax.scatter(xy[rows, 0], xy[rows, 1], color=_colour(task_idx),
                           marker=MARKERS[cluster % len(MARKERS)], s=18,
                           label=f"{task}, cluster {cluster}")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{run.method} seed {run.seed}: fingerprints (ARI "
                 f"{doc.get('quality', {}).get('ari', float('nan')):.2f})")
    _legend(ax, len(tasks))
    return fig


def _heatmap(matrix: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str], title: str,
             colorbar: str, width: float = COLUMN) -> Figure:
    fig, ax = _figure(max(2.0, 0.18 * len(ylabels) + 1.0), width)
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=5)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=5)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar)
    return fig


def graph_heatmap(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """The client graph's adjacency (``graph.json``), clients ordered by true task."""
    run = _first_with(grouped, "graph.json")
    if run is None:
        return "no run wrote graph.json (Laplacian methods: mira, atlas)"
    doc = run.files["graph.json"]
    order = sorted(range(len(doc["clients"])), key=lambda i: (doc["task"][i], doc["clients"][i]))
    adjacency = np.asarray(doc["adjacency"], dtype=float)[np.ix_(order, order)]
    labels = [f"{doc['clients'][i]} {doc['task'][i]}" for i in order]
    return _heatmap(adjacency, labels, labels,
                    f"{run.method} seed {run.seed}: client graph", "edge weight")


def rank_map(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Each client's LoRA rank per module (``clients.json``)."""
    run = _first_with(grouped, "clients.json")
    if run is None:
        return "no run wrote clients.json (per-client ranks: Phase 2 methods)"
    doc = run.files["clients.json"]
    clients = sorted(doc, key=int)
    modules = list(doc[clients[0]]["ranks"])
    matrix = np.array([[doc[c]["ranks"].get(m, 0) for m in modules] for c in clients])
    short = [m.replace("encoder.layer.", "L").replace(".attention.self.", ".") for m in modules]
    return _heatmap(matrix, short, [f"{c} {doc[c]['device']}" for c in clients],
                    f"{run.method} seed {run.seed}: ranks", "rank", width=2 * COLUMN)


def cut_points(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """The split clients' cut (blocks kept on the device) by device (``clients.json``)."""
    run = next((r for runs in grouped.values() for r in runs if "clients.json" in r.files
                and any(v.get("split") for v in r.files["clients.json"].values())), None)
    if run is None:
        return "no run split a client (clients.json without cuts)"
    doc = run.files["clients.json"]
    devices = sorted({v["device"] for v in doc.values()})
    fig, ax = _figure()
    for i, device in enumerate(devices):
        cuts = [v["split"]["cut"] if v.get("split") else None for v in doc.values()
                if v["device"] == device]
        whole = sum(c is None for c in cuts)
        split = [c for c in cuts if c is not None]
        ax.scatter([i] * len(split), split, color=_colour(i), s=18, label=None)
        ax.annotate(f"{whole} whole", (i, 0), fontsize=6, ha="center", va="bottom")
    ax.set_xticks(range(len(devices)), devices, rotation=20)
    ax.set_ylabel("cut (blocks on the device)")
    ax.set_title(f"{run.method} seed {run.seed}: split points")
    return fig


def lambda_sweep(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Validation, local and global metric against lambda (arms that differ in ``laplacian.lam``).

    Lambda is chosen on the validation curve; the two test curves are reported beside it.
    """
    points: list[tuple[float, dict[str, list[float]]]] = []
    for runs in grouped.values():
        lams = {r.config.get("laplacian", {}).get("lam") for r in runs}
        if len(lams) == 1 and None not in lams and len(grouped) > 1:
            lam = float(next(iter(lams)))  # type: ignore[arg-type]
            values = {key: [float(r.summary["average"][key]) for r in runs  # type: ignore[index]
                            if key in r.summary["average"]]  # type: ignore[index]
                      for key in ("val_metric", "local_metric", "global_metric")}
            points.append((lam, values))
    if len({p[0] for p in points}) < 2:
        return "the runs do not differ in laplacian.lam"
    points.sort(key=lambda p: p[0])
    fig, ax = _figure()
    names = {"val_metric": "validation (chooses)", "local_metric": "local test (reported)",
             "global_metric": "global test (reported)"}
    for i, (key, name) in enumerate(names.items()):
        series = [(lam, values[key]) for lam, values in points if values[key]]
        if series:
            means = [statistics.fmean(v) for _, v in series]
            ax.errorbar([s[0] for s in series], means,
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in series],
                        color=_colour(i), marker=MARKERS[i], markersize=3, capsize=1.5,
                        label=name)
            for (lam, seeds), mean in zip(series, means, strict=True):  # seeds differ: say so
                ax.annotate(f"n={len(seeds)}", (lam, mean), textcoords="offset points",
                            xytext=(3, 3), fontsize=5, color=_colour(i))
    ax.set_xlabel("lambda (0: local)")
    ax.set_ylabel("average metric (mean ± SD over seeds)")
    ax.legend(frameon=False)
    return fig


def client_heatmap(grouped: dict[str, list[RunRecord]]) -> Figure | str:
    """Each client's metric on its own local test (mean over seeds) per arm."""
    clients = sorted({(c["client"], c["task"]) for runs in grouped.values() for r in runs
                      for c in r.summary["clients"]})  # type: ignore[index]
    matrix = np.full((len(clients), len(grouped)), np.nan)
    for j, runs in enumerate(grouped.values()):
        for i, (cid, _) in enumerate(clients):
            values = [c["local_metric"] for r in runs for c in r.summary["clients"]  # type: ignore
                      if c["client"] == cid and "local_metric" in c]
            if values:
                matrix[i, j] = statistics.fmean(values)
    if np.isnan(matrix).all():
        return "no run has local scores"
    return _heatmap(matrix, list(grouped), [f"{c} {t}" for c, t in clients],
                    "final metric per client on its local test", "metric")


FIGURES: dict[str, Drawer] = {
    "convergence": convergence, "task_bars": task_bars, "local_vs_global": local_vs_global,
    "bytes_vs_metric": bytes_vs_metric,
    "memory_vs_metric": memory_vs_metric, "fingerprint_map": fingerprint_map,
    "graph_heatmap": graph_heatmap, "rank_map": rank_map, "cut_points": cut_points,
    "lambda_sweep": lambda_sweep, "client_heatmap": client_heatmap,
}


def draw_figures(records: Sequence[RunRecord], out: Path) -> tuple[list[Path], list[str]]:
    """Every figure the runs have data for, as ``out/<name>.png`` (300 DPI) and ``.pdf``.

    Returns (files written, one line per figure skipped and why).
    """
    grouped = arms(records)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
        for name, draw in FIGURES.items():
            result = draw(grouped) if grouped else "no finished run"
            if isinstance(result, str):
                skipped.append(f"{name}: skipped, {result}")
                continue
            for suffix in (".png", ".pdf"):
                path = out / f"{name}{suffix}"
                result.savefig(path, dpi=300)  # the PDF stays vector; dpi only rasters the PNG
                written.append(path)
    return written, skipped
