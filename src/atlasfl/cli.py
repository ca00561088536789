"""Command line: ``atlasfl run | tasks | models``. Parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from atlasfl.errors import AtlasError

# CLI flag -> dotted config key
FLAG_KEYS = {
    "method": "method", "model": "model.name", "tasks": "data.tasks",
    "clients_per_task": "data.clients_per_task", "samples": "data.samples",
    "eval_samples": "data.eval_samples", "max_length": "data.max_length",
    "rounds": "federation.rounds", "local_epochs": "train.local_epochs",
    "batch_size": "train.batch_size", "lr": "train.lr", "seed": "seed", "device": "device",
    "data_dir": "data.data_dir", "out": "out", "run_name": "run_name",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasfl", description="Federated multi-task LoRA "
                                     "fine-tuning of language models (ATLAS).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("--config", help="YAML config file (configs/quick.yaml, ...)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set train.head_lr=0.005")
    run.add_argument("--method", help="local, fedavg, fedavg-task, centralized, ...")
    run.add_argument("--model", help="preset (minilm, smollm2-135m, tiny-bert, ...) or HF id")
    run.add_argument("--tasks", nargs="+", help="task names, e.g. sst2 mrpc cola qnli")
    run.add_argument("--clients-per-task", type=int)
    run.add_argument("--samples", type=int, help="training examples per client")
    run.add_argument("--eval-samples", type=int, help="test examples per task (0 = all)")
    run.add_argument("--max-length", type=int)
    run.add_argument("--rounds", type=int)
    run.add_argument("--local-epochs", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--lr", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    run.add_argument("--data-dir", help="GLUE folder (default: $ATLASFL_DATA, ../shared/data/glue)")
    run.add_argument("--out", help="folder for run folders (default runs)")
    run.add_argument("--run-name", help="name of this run's folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("tasks", help="list tasks and whether their data is available offline")
    sub.add_parser("models", help="list models and whether they load offline")
    return parser


def _resolve_config(args: argparse.Namespace):
    from atlasfl.config import _set_dotted, apply_overrides, from_dict, from_yaml

    raw = from_yaml(args.config) if args.config else {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            _set_dotted(raw, key, value)
    if args.no_progress:
        raw["progress"] = False
    apply_overrides(raw, args.set)
    return from_dict(raw)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    from atlasfl.engine import RunDir, build_experiment, run_experiment
    from atlasfl.report import format_table

    print(f"atlasfl: {cfg.method} on {cfg.model.name}, tasks {' '.join(cfg.data.tasks)}, "
          f"{cfg.data.clients_per_task} clients per task, {cfg.federation.rounds} rounds",
          file=sys.stderr)
    experiment = build_experiment(cfg)  # every input error surfaces before a folder is made
    run_dir = RunDir.create(cfg)
    summary = run_experiment(experiment, run_dir)
    print(format_table(summary))
    print(f"\n{summary['num_clients']} clients, {summary['wall_seconds']:.1f} s wall "
          f"(cpu/wall {summary['cpu_utilisation']:.2f}), "
          f"peak RSS {summary['peak_rss_mb']:.0f} MiB, "
          f"{summary['bytes_up'] / 2**20:.2f} MiB up, {summary['bytes_down'] / 2**20:.2f} MiB down")
    print(f"run folder: {run_dir.path}")
    return 0


def _cmd_tasks() -> int:
    from atlasfl.data.glue import resolve_data_root
    from atlasfl.data.tasks import GLUE_TASKS

    root = resolve_data_root(None)
    print(f"data root: {root or 'none found (Hugging Face hub when online)'}")
    for spec in GLUE_TASKS.values():
        local = root is not None and (Path(root) / spec.train_file).is_file()
        labels = "regression" if spec.is_regression else "/".join(spec.label_names)
        print(f"  {spec.name:<6} {'+'.join(spec.metrics):<18} {labels:<40} "
              f"{'offline' if local else 'needs the hub'}")
    return 0


def _cmd_models() -> int:
    from atlasfl.models.registry import HUB_EXAMPLES, PRESETS

    for preset in PRESETS.values():
        ok = "offline" if preset.available() else "not installed"
        print(f"  {preset.name:<14} {ok:<14} {preset.description}")
    print(f"  any Hugging Face id when online, e.g. {', '.join(HUB_EXAMPLES)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``atlasfl`` console script."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "tasks":
            return _cmd_tasks()
        return _cmd_models()
    except AtlasError as exc:
        print(f"atlasfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlasfl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
