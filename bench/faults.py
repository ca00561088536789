"""Fault injection against the clean run (issue 18): the same config and seeds, with dropouts.

Runs ``atlasfl run --config CONFIG --set faults.drop_during=P --set seed=S`` into
``OUT/seedS`` for each seed (a seed whose run folder holds a summary is read, not rerun), then
prints per seed the clean and faulty average metric and accuracy (shared test rows), and the
events the faulty run recorded in rounds.jsonl: updates lost to dropouts, late or refused
updates, and groups that kept their previous model because no member delivered.

    python bench/faults.py --clean runs/bench-atlas/iid --method atlas --seeds 0 1 2 \
        --out runs/bench-faults --drop-during 0.3
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _summary(folder: Path) -> dict | None:
    found = sorted(folder.glob("*/summary.json")) + sorted(folder.glob("summary.json"))
    return json.loads(found[-1].read_text()) if found else None


def _events(run: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in (run / "rounds.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "client" not in row:
            continue
        lost = [kind for kind in ("dropped", "late", "refused") if kind in row]
        counts.update(lost)
        if row.get("trained") and not lost:
            counts["delivered"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--clean", required=True, help="folder of method=M_seed=S clean runs")
    parser.add_argument("--method", default="atlas")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-faults")
    parser.add_argument("--drop-during", type=float, default=0.3)
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        if _summary(out) is None:
            subprocess.run([sys.executable, "-m", "atlasfl.cli", "run", "--config", args.config,
                            "--method", args.method, "--set", f"seed={seed}", "--set",
                            f"faults.drop_during={args.drop_during}", "--no-progress",
                            "--out", str(out)], check=True)
        faulty = _summary(out)
        clean = _summary(Path(args.clean) / f"method={args.method}_seed={seed}")
        if faulty is None or clean is None:
            print(f"seed {seed}: missing {'clean' if clean is None else 'faulty'} run")
            continue
        run = sorted(p.parent for p in out.glob("*/summary.json"))[-1]
        rows.append((seed, clean["average"], faulty["average"], _events(run)))
    print(f"{args.method}, faults.drop_during={args.drop_during}: clean vs faulty (shared test "
          f"rows), and the faulty run's recorded events\n")
    print("| seed | clean metric | faulty metric | clean acc | faulty acc | updates delivered "
          "| dropped | late | refused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, c, f, ev in rows:
        print(f"| {seed} | {c['global_metric']:.3f} | {f['global_metric']:.3f} | "
              f"{c['global_accuracy']:.3f} | {f['global_accuracy']:.3f} | {ev['delivered']} | "
              f"{ev['dropped']} | {ev['late']} | {ev['refused']} |")
    if len(rows) > 1:
        diffs = [f["global_metric"] - c["global_metric"] for _, c, f, _ in rows]
        accs = [f["global_accuracy"] - c["global_accuracy"] for _, c, f, _ in rows]
        print(f"\nfaulty minus clean over {len(rows)} seeds: metric {statistics.mean(diffs):+.3f} "
              f"± {statistics.stdev(diffs):.3f}, accuracy {statistics.mean(accs):+.3f} ± "
              f"{statistics.stdev(accs):.3f}")


if __name__ == "__main__":
    main()
