"""Phase 2 rank plans per device profile: where the memory budget binds.

For each model and each built-in device profile, allocate per-module LoRA ranks with
``ranks.budget = memory`` (memory only, no parameter parity) and print the memory model's
estimate at the smallest adapter, the plan's estimate, the budget, the ranks (mean, min, max)
and what stopped the growth. Models are described from their configs only (module shapes from a
model built on the ``meta`` device: no weights are loaded): all-MiniLM-L6-v2, SmolLM2-135M and a
Qwen2.5-0.5B-sized config (published dimensions; its weights alone are 1.98 GB in fp32). When even
the smallest adapter does not fit, the line also gives the most leading blocks the device could
hold with the rest on the server (Phase 3's split point). Importance is uniform here (the plan
then favours cheap modules); a real run uses the clients' measured importance (clients.json).

    python bench/ranks.py                       # batch 16, sequence 128, r 1..64
    python bench/ranks.py --batch 8 --seq 256 --targets all
    python bench/ranks.py --quick          # hetlora's plans on quick.yaml, measured importance
    python bench/ranks.py --quick --set 'ranks.utility="spectrum"'   # and the gradient spectra
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, Qwen2Config

from atlasfl.devices import BUILTIN_PROFILES
from atlasfl.models.registry import _minilm_dir, cache_dir, default_targets
from atlasfl.phases.memory import estimate_memory, model_dims
from atlasfl.phases.ranks import allocate_ranks

ALL_LINEAR = {"bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                       "output.dense"),
              "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")}
ALL_LINEAR["qwen2"] = ALL_LINEAR["llama"]


def configs() -> dict[str, object]:
    out = {"minilm": AutoConfig.from_pretrained(_minilm_dir())}
    cached = cache_dir() / "smollm2-135m" / "config.json"
    if cached.is_file():
        out["smollm2-135m"] = LlamaConfig.from_dict(json.loads(cached.read_text()))
    else:  # published dimensions of HuggingFaceTB/SmolLM2-135M
        out["smollm2-135m"] = LlamaConfig(hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9,
                                          num_key_value_heads=3, vocab_size=49152,
                                          tie_word_embeddings=True)
    # published dimensions of Qwen/Qwen2.5-0.5B
    out["qwen2.5-0.5b-sized"] = Qwen2Config(hidden_size=896, intermediate_size=4864,
                                            num_hidden_layers=24, num_attention_heads=14,
                                            num_key_value_heads=2, vocab_size=151936,
                                            tie_word_embeddings=True)
    return out


def lora_shapes(config, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear whose name ends with a target, from a weightless model."""
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name.endswith(t) for t in targets)
            and "pooler" not in name}


def quick_plans(seed: int, overrides: dict) -> None:
    """hetlora's plans on configs/quick.yaml: importance measured on each client's data.

    With ``ranks.utility=spectrum`` also prints, per client and kind of module (the last part of
    its path), the range over layers of the first singular value's share of the gradient energy
    and of the total energy.
    """
    from atlasfl.config import from_dict, from_yaml
    from atlasfl.engine import CommLedger, build_experiment, run_exchange
    from atlasfl.engine.executor import make_executor
    from atlasfl.strategies import RoundInfo

    cfg = from_dict(from_yaml("configs/quick.yaml")).replace(
        method="hetlora", seed=seed, progress=False, **{"model.lora.rslora": True, **overrides})
    exp = build_experiment(cfg)
    r = cfg.ranks
    # round 1's first exchange: every client's importance, then the server's rank plans
    done = run_exchange(make_executor(exp, CommLedger()), exp.strategy, exp.strategy.init(),
                        RoundInfo(1, tuple(sorted(exp.clients)), evaluate=False))
    scores = {reply.client_id: reply.importance for reply in done.replies}  # as received
    records = done.outcome.state.plan.records
    for cid, rec in records.items():
        ranks = " ".join(f"{r:>2}" for r in rec["ranks"].values())
        print(f"client {cid:>2} {rec['task']:<5} {rec['device']:<11} "
              f"{rec['memory_estimate_bytes'] / 2**20:6.0f} MiB of "
              f"{rec['budget_bytes'] / 2**30:.0f} GiB  {rec['limited_by']:<10} ranks {ranks}")
    print("modules:", ", ".join(next(iter(records.values()))["ranks"]))
    if r.utility != "spectrum":
        return
    print(f"gradient spectra: first singular value's share of the top {r.r_max} (min-max over "
          f"layers) and their total energy")
    for cid, spectra in scores.items():
        kinds: dict[str, list[list[float]]] = {}
        for path, values in spectra.items():
            kinds.setdefault(path.rsplit(".", 1)[-1], []).append(values)
        parts = []
        for kind, rows in kinds.items():
            share = [v[0] / sum(v) for v in rows]
            energy = [sum(v) for v in rows]
            parts.append(f"{kind} share {min(share):.2f}-{max(share):.2f} "
                         f"energy {min(energy):.1e}-{max(energy):.1e}")
        print(f"client {cid:>2} {exp.clients[cid].task.name:<5} " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="hetlora plans on quick.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r-min", type=int, default=1)
    parser.add_argument("--r-max", type=int, default=64)
    parser.add_argument("--targets", choices=["default", "all"], default="default")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--set", nargs="*", default=[],
                        help="with --quick: config overrides key=JSON value")
    args = parser.parse_args()
    if args.quick:
        quick_plans(args.seed, {k: json.loads(v)
                                for k, v in (item.split("=", 1) for item in args.set)})
        return
    print(f"batch {args.batch}, sequence {args.seq}, ranks {args.r_min}..{args.r_max}, "
          f"targets {args.targets}")
    print(f"{'model':<20}{'device':<12}{'modules':>8}{'min MiB':>9}{'budget':>8}{'plan MiB':>9}"
          f"{'mean r':>8}{'min r':>6}{'max r':>6}  limited by")
    for name, config in configs().items():
        dims = model_dims(config)
        family = config.model_type
        targets = (ALL_LINEAR.get(family, default_targets(family)) if args.targets == "all"
                   else default_targets(family))
        shapes = lora_shapes(config, targets)

        def memory(ranks, blocks=None, dims=dims, shapes=shapes):
            modules = [(ranks[m], *shapes[m]) for m in ranks]
            return estimate_memory(dims, modules, batch_size=args.batch, seq_len=args.seq,
                                   blocks_held=blocks, head_params=dims.hidden * 2 + 2).total

        for profile in BUILTIN_PROFILES.values():
            plan = allocate_ranks(dict.fromkeys(shapes, 1.0), shapes, memory_of=memory,
                                  budget_bytes=profile.memory_bytes, r_min=args.r_min,
                                  r_max=args.r_max)
            ranks = list(plan.ranks.values())
            smallest = memory(dict.fromkeys(shapes, args.r_min))
            note = plan.limited_by if plan.feasible else "INFEASIBLE"
            split = None
            if not plan.feasible:
                for blocks in range(dims.num_layers, -1, -1):
                    held = {m: args.r_min for m in shapes if _block(m) < blocks}
                    if memory(held, blocks) <= profile.memory_bytes:
                        split = blocks
                        break
                note += (f": holds {split} of {dims.num_layers} blocks if split"
                         if split is not None else ": not even the embeddings")
            print(f"{name:<20}{profile.name:<12}{len(shapes):>8}{smallest / 2**20:>9.0f}"
                  f"{profile.memory_bytes / 2**30:>7.0f}G{plan.memory_bytes / 2**20:>9.0f}"
                  f"{sum(ranks) / len(ranks):>8.1f}{min(ranks):>6}{max(ranks):>6}  {note}")
            if args.out:
                with Path(args.out).open("a") as fh:
                    fh.write(json.dumps({
                        "model": name, "device": profile.name, "batch": args.batch,
                        "seq": args.seq, "targets": args.targets, "modules": len(shapes),
                        "min_bytes": smallest, "budget_bytes": profile.memory_bytes,
                        "plan_bytes": plan.memory_bytes, "feasible": plan.feasible,
                        "limited_by": plan.limited_by, "split_blocks": split,
                        "ranks": plan.ranks}) + "\n")


def _block(module: str) -> int:
    """Block index of a module path (``layers.3.self_attn.q_proj`` -> 3)."""
    return next(int(p) for p in module.split(".") if p.isdigit())


if __name__ == "__main__":
    main()
