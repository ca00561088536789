"""Command line: ``atlasfl run | resume | sweep | compare | tune | report | methods | ...``.

Parsing only; the work is in the library. The grid commands (sweep, compare, tune) are in
``grids``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from atlasfl.cli.grids import GRID_COMMANDS, add_grid_commands
from atlasfl.cli.stopping import install_stop_handlers
from atlasfl.errors import AtlasError

if TYPE_CHECKING:
    import torch

# CLI flag -> dotted config key
FLAG_KEYS = {
    "method": "method", "model": "model.name", "tasks": "data.tasks",
    "clients_per_task": "data.clients_per_task", "samples": "data.samples",
    "eval_samples": "data.eval_samples", "max_length": "data.max_length",
    "rounds": "federation.rounds", "local_epochs": "train.local_epochs",
    "batch_size": "train.batch_size", "lr": "train.lr", "seed": "seed", "device": "device",
    "data_dir": "data.data_dir", "out": "out", "run_name": "run_name",
    "max_rounds": "session.max_rounds", "save_every": "session.save_every",
    "keep_checkpoints": "session.keep_checkpoints",
}


ENGINES = ("in-process", "flower-sim")


def _session_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-rounds", type=int,
                        help="stop cleanly after this many rounds in this session")
    parser.add_argument("--save-every", type=int, help="checkpoint every N rounds (default 1)")
    parser.add_argument("--keep-checkpoints", type=int, help="checkpoints to keep (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--engine", choices=ENGINES, default="in-process",
                        help="in-process (default) or flower-sim: the same rounds on Flower's "
                        "simulation runtime (Ray), one virtual SuperNode per client; needs "
                        "pip install 'atlasfl[flower]'")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasfl", description="Federated multi-task LoRA "
                                     "fine-tuning of language models (ATLAS).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("--config", help="YAML config file (configs/quick.yaml, ...)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set train.head_lr=0.005")
    run.add_argument("--method", help="atlas, local, fedavg, fedavg-task, mira, ... "
                     "(atlasfl methods lists them all)")
    run.add_argument("--model", help="preset (minilm, smollm2-135m, tiny-bert, ...) or HF id")
    run.add_argument("--tasks", nargs="+", help="task names, e.g. sst2 mrpc cola qnli")
    run.add_argument("--clients-per-task", type=int)
    run.add_argument("--samples", type=int, help="examples per client, its validation rows "
                     "(data.val_fraction) included")
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
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run folder --run-name names if it holds a run")
    run.add_argument("--resume", metavar="PATH",
                     help="continue a run from its folder or one checkpoint folder")
    _session_flags(run)
    resume = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    resume.add_argument("run_dir", help="the run folder (or one of its checkpoint folders)")
    _session_flags(resume)
    add_grid_commands(sub)
    report = sub.add_parser(
        "report", help="tables, statistics and figures from run folders",
        description="Reads run folders (or folders of them) and writes REPORT/report.md, "
        "REPORT/tables/*.{md,csv,tex} and REPORT/figures/*.{png,pdf}. Runs that did not "
        "finish are listed, never averaged.")
    report.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    report.add_argument("--out", help="the report's folder (default: FIRST/report)")
    report.add_argument("--vs", help="the method the others are paired against "
                        "(default atlas when present)")
    report.add_argument("--no-figures", action="store_true", help="tables only")
    sub.add_parser("methods", help="list the methods with one line each")
    tasks = sub.add_parser("tasks", help="list tasks and whether their files are on disk")
    tasks.add_argument("--data-dir", help="GLUE folder (default: $ATLASFL_DATA, "
                       "../shared/data/glue)")
    sub.add_parser("models", help="list models and whether they load offline")
    return parser


def _resolve_config(args: argparse.Namespace, raw: dict | None = None):
    """The file (or a checkpoint's config), its method's settings, then flags, then ``--set``."""
    from atlasfl.config import from_dict, from_yaml, layered, parse_overrides

    if raw is None:
        raw = from_yaml(args.config) if args.config else {}
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()
             if getattr(args, flag, None) is not None}
    if args.no_progress:
        flags["progress"] = False
    return from_dict(layered(raw, flags, parse_overrides(getattr(args, "set", []))))


def _per_task(task_samples: dict[str, int]) -> str:
    return "".join(f", {n} for {task}" for task, n in task_samples.items())


def _threads_note(threads: int, workers: int, device: torch.device) -> str:
    """How clients run: torch threads, and worker processes when there are several."""
    from atlasfl.engine.setup import resolve_threads, resolve_workers

    total, procs = resolve_threads(threads), resolve_workers(workers, threads, device)
    if procs <= 1:
        return f"{total} torch threads"
    return f"{procs} worker processes x {max(1, total // procs)} torch thread(s)"


def _cmd_run(args: argparse.Namespace) -> int:
    from atlasfl.config import check_same_experiment
    from atlasfl.engine import RunDir, build_experiment, load_checkpoint, run_experiment
    from atlasfl.engine.checkpoint import find_run, latest_checkpoint
    from atlasfl.engine.setup import resolve_device

    resume_from = args.resume if args.command == "run" else args.run_dir
    if resume_from:
        found = find_run(resume_from)
        if found != Path(resume_from):
            print(f"atlasfl: {resume_from} holds one run: resuming {found}", file=sys.stderr)
        resume_from = str(found)
    snapshot = load_checkpoint(resume_from) if resume_from else None
    if snapshot is not None and not getattr(args, "config", None):
        cfg = _resolve_config(args, raw=copy.deepcopy(snapshot.config))
    else:
        cfg = _resolve_config(args)
    if snapshot is not None:
        check_same_experiment(snapshot.config, cfg)
    print(f"atlasfl: {cfg.method} on {cfg.model.name}, tasks {' '.join(cfg.data.tasks)}, "
          f"{cfg.data.clients_per_task} clients per task with {cfg.data.samples} examples "
          f"each{_per_task(cfg.data.task_samples)} ({cfg.data.val_fraction:.0%} held out for "
          f"validation, {cfg.data.test_fraction:.0%} as its local test), "
          f"{cfg.federation.rounds} rounds, "
          f"{_threads_note(cfg.train.threads, cfg.train.workers, resolve_device(cfg.device))}, "
          f"{_precision_note(cfg.train.precision, resolve_device(cfg.device))}"
          + (f", resuming after round {snapshot.round_idx}" if snapshot else ""),
          file=sys.stderr)
    experiment = build_experiment(cfg)  # every input error surfaces before a folder is made
    if snapshot is not None:
        run_dir = RunDir(_run_folder(resume_from))
    else:
        new_out = not Path(cfg.out).exists()
        run_dir = RunDir.create(cfg, overwrite=bool(getattr(args, "overwrite", False)))
    stop = install_stop_handlers()
    run = _flower_simulation() if args.engine == "flower-sim" else run_experiment
    try:
        outcome = run(experiment, run_dir, resume=snapshot, stop=stop)
    except AtlasError:  # an input error found once the run started (a device that fits no
        # rank plan): a new run that saved nothing leaves no folder behind
        if snapshot is None and latest_checkpoint(run_dir.path) is None:
            shutil.rmtree(run_dir.path)
            if new_out and not any(run_dir.path.parent.iterdir()):
                run_dir.path.parent.rmdir()
        raise
    if outcome.summary is None:
        if outcome.checkpoint is None and snapshot is None:
            print("atlasfl: stopped before the first round was saved; nothing to resume")
        else:
            print(f"atlasfl: stopped after round {outcome.completed_rounds} of "
                  f"{cfg.federation.rounds}; last checkpoint "
                  f"{outcome.checkpoint or resume_from}\ncontinue with: atlasfl resume "
                  f"{run_dir.path}")
        return 130 if stop.requested else 0
    _print_summary(outcome.summary, run_dir.path)
    return 0


def _precision_note(precision: str, device) -> str:
    from atlasfl.client.training import resolve_precision

    resolved = resolve_precision(precision, device)
    if precision != "auto":
        return f"precision {resolved}"
    why = "bf16 is fast here" if resolved == "bf16" else "no bf16 fast path here"
    return f"precision {resolved} (auto on {device.type}: {why})"


def _flower_simulation():
    try:
        from atlasfl.engine.flower.server_app import run_flower_simulation
    except ImportError as exc:
        raise AtlasError(f"--engine flower-sim needs Flower ({exc}); install it with "
                         f"pip install 'atlasfl[flower]'") from None
    return run_flower_simulation


def _run_folder(path: str) -> Path:
    from atlasfl.engine.checkpoint import CHECKPOINTS, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    assert checkpoint.parent.name == CHECKPOINTS
    return checkpoint.parent.parent


def _print_summary(summary: dict, run_path: Path) -> None:
    from atlasfl.report import format_table

    print(format_table(summary))
    host = summary.get("host")  # absent from summaries written before it was recorded
    on = f" on {host.get('gpu') or host['cpu']}" if host else ""
    print(f"\n{summary['num_clients']} clients, {summary['wall_seconds']:.1f} s wall{on} "
          f"(cpu/wall {summary['cpu_utilisation']:.2f}), "
          f"peak RSS {summary['peak_rss_mb']:.0f} MiB, "
          f"{summary['bytes_up'] / 2**20:.2f} MiB up, {summary['bytes_down'] / 2**20:.2f} MiB down")
    print(f"run folder: {run_path}")


def _cmd_report(args: argparse.Namespace) -> int:
    from atlasfl.report import write_report

    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
    print(write_report(args.runs, out, vs=args.vs, figures=not args.no_figures))
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_methods() -> int:
    from atlasfl.strategies import METHODS
    from atlasfl.strategies.methods import PARTS, differing_parts

    print(f"  {'method':<22} " + " ".join(f"{k:<11}" for k in PARTS) + " what it is")
    for name, recipe in METHODS.items():
        parts = recipe.parts()
        print(f"  {name:<22} " + " ".join(f"{parts[k]:<11}" for k in PARTS) + f" {recipe.summary}"
              + (f" [{recipe.paper}]" if recipe.paper else ""))
        if recipe.ablates:
            changed = differing_parts(recipe, METHODS[recipe.ablates])
            print(f"  {'':<22} = {recipe.ablates} with "
                  + ", ".join(f"{k} {parts[k]}" for k in changed))
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from atlasfl.data.glue import resolve_data_root
    from atlasfl.data.tasks import GLUE_TASKS

    root = resolve_data_root(args.data_dir)
    print(f"data root: {root or 'none found (Hugging Face hub when online)'}")
    for spec in GLUE_TASKS.values():
        files = [spec.train_file, spec.test_file]
        found = root is not None and all((Path(root) / f).is_file() for f in files)
        where = ("on disk" if found else
                 f"not under {root} (Hugging Face hub when online)" if root else "hub only")
        labels = "regression" if spec.is_regression else "/".join(spec.label_names)
        print(f"  {spec.name:<6} {'+'.join(spec.metrics):<18} {labels:<40} {where}")
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
    # deprecation notices of the libraries underneath tell a user of atlasfl nothing
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if args.command in ("run", "resume"):
            return _cmd_run(args)
        if args.command in GRID_COMMANDS:
            return GRID_COMMANDS[args.command](args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "methods":
            return _cmd_methods()
        if args.command == "tasks":
            return _cmd_tasks(args)
        return _cmd_models()
    except AtlasError as exc:
        print(f"atlasfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlasfl: interrupted", file=sys.stderr)
        return 130
