"""Bit-identity of two versions of atlasfl over 36 tiny runs: every method and its options.

Each run (tiny-bert/gpt2/llama, 2-3 tasks x 2 clients, 3-4 rounds, partial participation and
evaluation every 2 rounds included) leaves its round rows (timings dropped), its summary and
every client's tensors (adapter, head, AdamW moments). ``capture`` saves them from the atlasfl
that is importable; ``compare`` runs again and reports, per run, rows that differ, byte totals
that differ (shown apart: where downloads are counted is a protocol choice) and tensors that
are not bit-identical.

    git worktree add /tmp/atlasfl-before 0a1f63e          # the version to compare against
    PYTHONPATH=/tmp/atlasfl-before/src ATLASFL_DATA=../shared/data/glue \
        python bench/bit_identity.py capture /tmp/bits
    python bench/bit_identity.py compare /tmp/bits [NAME ...]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from atlasfl.engine import RunDir, build_experiment, run_experiment  # noqa: E402
from conftest import tiny_config  # noqa: E402

WATCH = {"devices.custom": [{"name": "watch", "memory_gb": 1e-4}],
         "devices.profiles": ["watch", "gpu-16gb"], "seed": 3}
HET = {"method": "hetlora", "model.lora.rslora": True, "ranks.r_max": 12}
DEVICE = {"ranks.budget": "device", "ranks.r_max": 64,
          "devices.assignment": ["cpu-2gb", "gpu-16gb", "gpu-16gb", "cpu-2gb"]}
CLUSTER = {"clustering.samples": 8, "clustering.dim": 32}
# a device that holds a tiny-bert client part at cut 0 but not the whole model (measured once)
WEAK = {"devices.custom": [{"name": "weak", "memory_gb": 0.0044109}], "seed": 5,
        "devices.profiles": ["weak", "gpu-16gb"], "split.min_cut": 0,
        "ranks.on_infeasible": "exclude"}
PARTIAL = {"federation.fraction": 0.75, "federation.eval_every": 2, "federation.rounds": 4}
RUNS = {
    "local": {"method": "local"},
    "fedavg": {"method": "fedavg"},
    "fedavg-partial": {"method": "fedavg", **PARTIAL, "federation.fraction": 0.5},
    "fedavg-task-dir": {"method": "fedavg-task", "data.partition": "dirichlet",
                        "data.alpha": 0.5},
    "fedavg-task-partial": {"method": "fedavg-task", **PARTIAL},
    "cluster-k2": {"method": "fedavg-cluster", "clustering.k": 2, **CLUSTER},
    "cluster-auto-recluster": {"method": "fedavg-cluster", "clustering.recluster_every": 1,
                               "data.tasks": ["cola", "mrpc", "rte"], **CLUSTER},
    "cluster-dp-weights": {"method": "fedavg-cluster", "clustering.epsilon": 8.0,
                           "clustering.params": "weights", "clustering.statistic": "gradient",
                           "clustering.method": "spectral", **CLUSTER},
    "centralized": {"method": "centralized"},
    "homolora": {"method": "homolora", "model.lora.r": 4},
    "homolora-delta-partial": {"method": "homolora", "ranks.update": "delta",
                               "federation.fraction": 0.5, "federation.rounds": 4},
    "hetlora": HET,
    "hetlora-spectrum-cluster": {**HET, "ranks.utility": "spectrum", "ranks.grouping": "cluster",
                                 "clustering.k": 2, **CLUSTER},
    "hetlora-zeropad-device-delta": {**HET, **DEVICE, "ranks.aggregation": "zero-pad",
                                     "ranks.update": "delta"},
    "hetlora-stack-device-delta-partial": {**HET, **DEVICE, "ranks.update": "delta",
                                           "federation.fraction": 0.75,
                                           "federation.rounds": 4},
    "hetlora-svd-log-global-partial": {**HET, **PARTIAL, "ranks.aggregation": "svd",
                                       "ranks.utility": "log", "ranks.grouping": "global"},
    "hetlora-exclude": {**HET, **WATCH, "ranks.on_infeasible": "exclude"},
    "homolora-exclude": {"method": "homolora", **WATCH, "ranks.on_infeasible": "exclude"},
    "stsb-steps-headlr": {"method": "fedavg-task", "data.tasks": ["stsb", "cola"],
                          "train.local_steps": 2, "train.head_lr": 0.05},
    "gpt2-fedavg-task": {"method": "fedavg-task", "model.name": "tiny-gpt2",
                         "model.pooling": "auto"},
    "llama-hetlora": {**HET, "model.name": "tiny-llama", "model.pooling": "auto"},
    "bf16": {"method": "fedavg-task", "train.precision": "bf16"},
    # the methods with own models, shared A factors or split clients
    "fedsa": {"method": "fedsa"},
    "mira": {"method": "mira", **CLUSTER},
    "atlas": {"method": "atlas", **CLUSTER, "clustering.k": 2},
    "atlas-hybrid-partial": {"method": "atlas", **CLUSTER, **WEAK, **PARTIAL,
                             "laplacian.cross_weight": 0.5},
    "atlas-no-laplacian-hybrid": {"method": "atlas-no-laplacian", **CLUSTER, **WEAK},
    "atlas-oracle-homo-split": {"method": "atlas-oracle-clusters", "split.enabled": "always",
                                "split.min_cut": 0, **CLUSTER},
    "atlas-homo-rank": {"method": "atlas-homo-rank", **CLUSTER, "laplacian.lam": 0.5},
    "splitlora-vanilla": {"method": "splitlora", "split.cut": "1"},
    "splitlora-ushape-partial": {"method": "splitlora", "split.mode": "u-shape",
                                 "split.min_cut": 0, **PARTIAL},
    "hetlora-hybrid-zeropad": {**HET, **WEAK, "ranks.aggregation": "zero-pad",
                               "split.enabled": "auto", "federation.fraction": 0.5,
                               "federation.rounds": 4},
    # the schedules and simulated failures around the transport
    "faults-splitlora": {"method": "splitlora", "split.cut": "1", "faults.drop_before": 0.2,
                         "faults.drop_during": 0.4, "federation.rounds": 4},
    "faults-deadline": {"method": "fedavg-task", "faults.deadline_seconds": 2.0,
                        "faults.drop_during": 0.2, "federation.rounds": 4},
    "faults-workers": {"method": "fedavg-task", "train.workers": 2, "faults.drop_before": 0.25,
                       "faults.drop_during": 0.25, "federation.rounds": 4},
    "batched": {"method": "fedavg-task", "train.batch_clients": 2},
}
MACHINE = {"wall_seconds", "process_seconds", "cpu_utilisation", "peak_rss_mb", "peak_cuda_mb"}
BYTES = ("bytes_up", "bytes_down")
SERVER_FILES = ("clusters.json", "graph.json")  # what the server decided, beside clients.json


def _strip(row: dict) -> dict:
    """A row without timings and without the per-kind byte counts newer versions add."""
    return {k: v for k, v in row.items() if not k.endswith("seconds")
            and not (k.startswith("bytes_") and k not in BYTES)}


def run(name: str, folder: Path) -> tuple[list, dict, dict, dict | None, dict]:
    overrides = dict(RUNS[name])
    rounds = overrides.pop("federation.rounds", 3)
    shutil.rmtree(folder / name, ignore_errors=True)
    cfg = tiny_config(**{"federation.rounds": rounds, **overrides}).replace(
        out=str(folder), run_name=name)
    exp = build_experiment(cfg)
    run_dir = RunDir.create(exp.cfg)
    summary = run_experiment(exp, run_dir).summary
    rows = [_strip(json.loads(line))
            for line in (run_dir.path / "rounds.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in summary.items() if k not in MACHINE}
    summary["clients"] = [_strip(r) for r in summary["clients"]]
    tensors = {}
    for cid, client in exp.clients.items():
        state, _ = client.checkpoint()
        tensors.update({f"{cid}/{k}": v.detach().clone().contiguous() for k, v in state.items()})
    clients_file = run_dir.path / "clients.json"
    clients = json.loads(clients_file.read_text()) if clients_file.exists() else None
    files = {name: json.loads((run_dir.path / name).read_text()) for name in SERVER_FILES
             if (run_dir.path / name).exists()}
    return rows, summary, tensors, clients, files


def differences(saved: Path, rows, tensors, clients, files) -> list[str]:
    out = []
    want_rows = json.loads((saved / "rows.json").read_text())

    def no_bytes(row):
        return {k: v for k, v in row.items() if k not in BYTES}

    for a, b in zip(rows, want_rows, strict=True):
        if no_bytes(a) != no_bytes(b):
            diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
            out.append(f"first differing row, round {a['round']} client {a['client']} "
                       f"(now, before): {diff}")
            break
    for key in BYTES:
        now, before = sum(r[key] for r in rows), sum(r[key] for r in want_rows)
        if now != before:
            out.append(f"{key} total now {now}, before {before}")
    want = load_file(str(saved / "tensors.safetensors"))
    if set(want) != set(tensors):
        out.append(f"tensor names differ: {sorted(set(want) ^ set(tensors))[:5]}")
    else:
        unequal = [k for k in want if not torch.equal(want[k], tensors[k])]
        if unequal:
            out.append(f"{len(unequal)} of {len(want)} tensors differ, e.g. {unequal[:3]}")
    if json.loads((saved / "clients.json").read_text()) != clients:
        out.append("clients.json differs")
    for name, document in files.items():
        if (saved / name).exists() and json.loads((saved / name).read_text()) != document:
            out.append(f"{name} differs")
    return out


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    names = sys.argv[3:] or list(RUNS)
    failed = 0
    for name in names:
        rows, summary, tensors, clients, files = run(name, out / "runs")
        saved = out / name
        if mode == "capture":
            saved.mkdir(parents=True, exist_ok=True)
            (saved / "rows.json").write_text(json.dumps(rows))
            (saved / "summary.json").write_text(json.dumps(summary))
            (saved / "clients.json").write_text(json.dumps(clients))
            save_file(tensors, str(saved / "tensors.safetensors"))
            for file, document in files.items():
                (saved / file).write_text(json.dumps(document))
            print(f"captured {name}: {len(tensors)} tensors", flush=True)
            continue
        found = differences(saved, rows, tensors, clients, files)
        failed += bool(found)
        print(f"{'DIFF' if found else 'same'} {name} ({len(tensors)} tensors)"
              + "".join(f"\n    {line}" for line in found), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
