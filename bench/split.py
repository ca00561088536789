"""Phase 3 figures: split step time, client-part memory per cut, participation, activation bytes.

Five parts, each printed (all but ``equivalence`` also appended as JSON lines to
``bench/results/``):

``equivalence``  The largest relative error of a split step's loss and gradients against the
                 unsplit step, at every cut, both modes (the test's setup; the test asserts
                 <= 1e-5).

``steps``        In-process split step time over the unsplit step, all-MiniLM-L6-v2, batch 16,
                 length 128 (every token real), vanilla and U-shape. A and B alternate in one
                 process after a warm-up; the figure is the median of the per-pair ratios, with
                 process_time / wall so a loaded machine shows. Both sides do a whole training
                 step (forward, backward, clipping, AdamW) through the real code: ``train_client``'s
                 step for the unsplit model, ``split_step`` through the in-process channel and
                 ``SplitServer`` for the split one (the client's and the server's steps).
``memory``       The client part's training peak at each cut of minilm and smollm2-135m, measured
                 (live tensor bytes under ``torch.profiler``, a fresh child process per cut, as
                 ``bench/memory.py`` measures the whole model) vs ``split_memory``'s estimate,
                 beside the unsplit peak. The child builds the client part as a device would hold
                 it: the embeddings and the first ``cut`` blocks (random weights, eager attention,
                 fp32, LoRA r 8 on the family's default targets); one step = forward to the cut,
                 the message copy of the activations, a received gradient of the same shape,
                 backward, AdamW.
``participation`` smollm2-135m, ``hetlora`` with ``ranks.budget=memory``, devices drawn from the
                 four profiles, a reduced setting (below): without split (devices that cannot
                 hold the model are excluded) vs ``split.enabled=auto``. Clients that train,
                 average accuracy over ALL clients (an excluded client scores its untrained
                 adapter), bytes per round by kind.
``quick``        configs/quick.yaml with ``homolora`` and ``split.enabled=always`` (a server
                 model per task, cut chosen per device; ``zero-pad``, which at equal ranks is
                 FedAvg of the factors), fp32 vs fp16 activations, seeds 0-2: bytes per round by
                 kind and accuracy.

    python bench/split.py steps
    python bench/split.py equivalence
    python bench/split.py memory [--models minilm smollm2-135m]
    python bench/split.py participation
    python bench/split.py quick --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB = 2**20
sys.path.insert(0, str(Path(__file__).parent))


def _append(name: str, row: dict) -> None:
    with open(RESULTS / name, "a") as fh:
        fh.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- steps

def steps(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from atlasfl.client import make_client
    from atlasfl.client.split_training import split_step
    from atlasfl.client.training import forward_logits, task_loss
    from atlasfl.config import LoraSettings, TrainConfig
    from atlasfl.data.batching import TokenizedSet
    from atlasfl.data.tasks import resolve_tasks
    from atlasfl.engine.channel import InProcessChannel
    from atlasfl.engine.ledger import CommLedger
    from atlasfl.engine.split_server import SplitServer
    from atlasfl.messages import SplitPlan
    from atlasfl.models.head import init_head
    from atlasfl.models.lora import AdapterBinder, inject_lora
    from atlasfl.models.registry import load_backbone
    from atlasfl.strategies.state import ServerModel

    torch.manual_seed(0)
    backbone = load_backbone("minilm")
    lora = LoraSettings(r=8, alpha=16.0)
    model = inject_lora(backbone, lora, seed=0)
    binder = AdapterBinder(model, lora)
    init = binder.initial_state()
    layers = backbone.num_layers
    train = TrainConfig(lr=1e-4)
    head = init_head(backbone.hidden_size, 2, pooling="mean", dropout=0.1, seed=0)
    task = resolve_tasks(("sst2",))[0]
    empty = TokenizedSet([], None, np.zeros(0, dtype=np.int64), 0)
    b, t = args.batch, args.seq
    vocab = len(backbone.tokenizer)

    def batch() -> dict:
        return {"input_ids": torch.randint(1000, vocab, (b, t)),
                "attention_mask": torch.ones(b, t, dtype=torch.long),
                "token_type_ids": torch.zeros(b, t, dtype=torch.long),
                "labels": torch.randint(0, 2, (b,))}

    whole = make_client(0, task, init, copy.deepcopy(head), empty, empty, train,
                        torch.device("cpu"))

    def unsplit_step() -> None:
        data = batch()
        binder.bind(whole.adapter)
        model.train()
        whole.head.train()
        loss = task_loss(forward_logits(model, whole.head, data), data["labels"], False)
        whole.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*whole.adapter.values(), *whole.head.parameters()], 1.0)
        whole.optimizer.step()

    def split_runner(cut: int, tail: int):
        client = make_client(1, task, init, copy.deepcopy(head), empty, empty, train,
                             torch.device("cpu"))
        server = SplitServer(model, binder, num_layers=layers, train=train, initial_adapter=init,
                             initial_heads={2: head}, device=torch.device("cpu"),
                             models={"all": ServerModel()})
        plan = SplitPlan(cut, tail, args.dtype, "all", 2)
        server.open(1, plan)
        channel = InProcessChannel(CommLedger())

        def link(message):
            return channel.send(1, 1, "down", server.handle(1, channel.send(1, 1, "up", message)))

        def step() -> None:
            model.train()
            client.head.train()
            client.optimizer.zero_grad(set_to_none=True)
            split_step(model, binder, client, plan, link, batch(), num_layers=layers)
            torch.nn.utils.clip_grad_norm_([*client.adapter.values(),
                                            *client.head.parameters()], 1.0)
            client.optimizer.step()
        return step

    print(f"minilm batch {b} len {t}, {args.pairs} alternated pairs after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads, activations {args.dtype}")
    print(f"{'mode':<10}{'cut':>4}{'unsplit s':>11}{'split s':>9}{'ratio':>7}{'cpu/wall':>9}")
    for mode, cut, tail in (("vanilla", args.cut, 0), ("u-shape", args.cut, 1)):
        split = split_runner(cut, tail)
        for _ in range(args.warmup):
            unsplit_step()
            split()
        ratios, a_times, b_times = [], [], []
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.pairs):
            order = (unsplit_step, split) if i % 2 == 0 else (split, unsplit_step)
            timing = {}
            for fn in order:
                start = time.perf_counter()
                fn()
                timing[fn] = time.perf_counter() - start
            a_times.append(timing[unsplit_step])
            b_times.append(timing[split])
            ratios.append(timing[split] / timing[unsplit_step])
        load = (time.process_time() - cpu) / (time.perf_counter() - wall)
        ratio = statistics.median(ratios)
        print(f"{mode:<10}{cut:>4}{statistics.median(a_times):>11.3f}"
              f"{statistics.median(b_times):>9.3f}{ratio:>7.3f}{load:>9.2f}", flush=True)
        _append("split_steps.jsonl", {"mode": mode, "cut": cut, "tail": tail, "batch": b,
                                      "seq": t, "dtype": args.dtype, "pairs": args.pairs,
                                      "median_ratio": ratio, "ratios": ratios,
                                      "unsplit_s": a_times, "split_s": b_times,
                                      "cpu_over_wall": load})


# ----------------------------------------------------------------------------- equivalence

def equivalence(args: argparse.Namespace) -> None:
    """The largest relative error of the split step against the unsplit one, per model/mode.

    Uses the test's setup (``tests/models/test_cut.py``): the real protocol, a padded batch,
    every cut; the test asserts <= 1e-5, this prints what is observed.
    """
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "models"))
    from test_cut import Setup, _relative

    for name in args.models:
        setup = Setup(name)
        loss, grads = setup.unsplit()
        for tail in (0, 1):
            worst_loss = worst_grad = 0.0
            cuts = range(0, setup.num_layers - tail)
            for cut in cuts:
                split_loss, split_grads = setup.split(cut, tail)
                worst_loss = max(worst_loss, abs(split_loss - loss) / abs(loss))
                worst_grad = max(worst_grad, max(_relative(split_grads[k], g)
                                                 for k, g in grads.items()))
            print(f"{name:<11}{'u-shape' if tail else 'vanilla':<9} cuts {cuts.start}.."
                  f"{cuts.stop - 1}, {len(grads)} gradients: max relative error of the loss "
                  f"{worst_loss:.1e}, of a gradient {worst_grad:.1e}", flush=True)


# ----------------------------------------------------------------------------- memory

def memory_child(args: argparse.Namespace) -> dict:
    import memory as benchmem
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from atlasfl.models.registry import FAMILY_TARGETS

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = benchmem.load_config(args.model)
    layers = config.num_hidden_layers
    whole = args.cut >= layers
    result: dict = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        part = copy.deepcopy(config)
        part.num_hidden_layers = layers if whole else args.cut
        kwargs = {"add_pooling_layer": False} if config.model_type == "bert" and not whole else {}
        backbone = AutoModel.from_config(part, attn_implementation="eager", **kwargs)
        if not whole:  # the client stops at its cut: no final norm
            for name in ("norm", "ln_f"):
                if hasattr(backbone, name):
                    setattr(backbone, name, torch.nn.Identity())
        model = get_peft_model(backbone, LoraConfig(
            r=8, lora_alpha=16, target_modules=list(FAMILY_TARGETS[config.model_type])))
        head = torch.nn.Linear(config.hidden_size, 2) if whole else None
        params = [p for p in model.parameters() if p.requires_grad]
        params += list(head.parameters()) if head is not None else []
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for _ in range(args.steps):
            if whole:
                benchmem._step(model, head, opt, args.batch, args.seq, config.vocab_size)
                continue
            ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
            mask = torch.ones(args.batch, args.seq, dtype=torch.long)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            sent = hidden.detach().clone()  # the message buffer the channel sends
            grad = torch.randn_like(hidden)  # the gradient the server sends back
            hidden.backward(grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del sent, grad, hidden
    result["measured_bytes"], _ = benchmem._tensor_peak(prof)
    result["lora_modules"] = benchmem._lora_modules(model)
    result["head_params"] = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return result


def memory(args: argparse.Namespace) -> None:
    import memory as benchmem

    from atlasfl.phases.memory import estimate_memory, model_dims
    from atlasfl.phases.cuts import split_memory

    print(f"client part peak per cut: batch {args.batch}, len {args.seq}, fp32, eager, AdamW, "
          "LoRA r 8 (q, v), 1 thread; activations cross in fp32")
    print(f"{'model':<14}{'cut':>4}{'est MiB':>9}{'meas MiB':>10}{'est/meas':>9}{'s':>6}")
    for name in args.models:
        config = benchmem.load_config(name)
        dims = model_dims(config)
        layers = dims.num_layers
        cuts = args.cuts or sorted({1, 2, layers // 4, layers // 2, 3 * layers // 4, layers - 1})
        for cut in [*cuts, layers]:
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "memory-child", "--model", name, "--cut", str(cut),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", "2"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"child failed for {name} cut {cut}:\n{done.stderr}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            modules = [tuple(m) for m in got["lora_modules"]]
            if cut >= layers:
                est = estimate_memory(dims, modules, batch_size=args.batch, seq_len=args.seq,
                                      head_params=got["head_params"]).total
            else:
                est = split_memory(dims, modules, cut=cut, tail=0, batch_size=args.batch,
                                   seq_len=args.seq, act_bytes=4)
            measured = got["measured_bytes"]
            label = f"{cut}" if cut < layers else "all"
            print(f"{name:<14}{label:>4}{est / MIB:>9.1f}{measured / MIB:>10.1f}"
                  f"{est / measured:>9.3f}{time.perf_counter() - start:>6.0f}", flush=True)
            _append("split_memory_cpu.jsonl", {"model": name, "cut": cut, "whole": cut >= layers,
                                               "batch": args.batch, "seq": args.seq,
                                               "estimated": est, "measured": measured,
                                               "ratio": est / measured})


# ----------------------------------------------------------------------------- runs

def _run(overrides: dict, config: str | None = None) -> dict:
    from atlasfl.config import from_dict, from_yaml
    from atlasfl.engine import build_experiment, run_experiment

    raw = from_yaml(config) if config else {}
    cfg = from_dict(raw).replace(**{"progress": False, **overrides})
    wall, cpu = time.perf_counter(), time.process_time()
    exp = build_experiment(cfg)
    outcome = run_experiment(exp)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    summary = outcome.summary
    state = outcome.state
    rounds = cfg.federation.rounds
    return {"summary": summary, "excluded": list(getattr(state, "excluded", ())),
            "split": sorted(int(c) for c in getattr(state, "cuts", {})),
            "cuts": {c: list(v) for c, v in getattr(state, "cuts", {}).items()},
            "devices": {c: p.name for c, p in exp.strategy.ctx.devices.items()},
            "bytes_per_round": {k: v / rounds for k, v in summary["bytes_by_kind"].items()},
            "wall": wall, "cpu_over_wall": cpu / wall}


PARTICIPATION = {
    "model.name": "smollm2-135m", "method": "hetlora", "ranks.budget": "memory",
    "ranks.utility": "spectrum", "ranks.on_infeasible": "exclude", "ranks.grouping": "task",
    "data.tasks": ["sst2", "mrpc"], "data.clients_per_task": 3, "data.samples": 64,
    "data.eval_samples": 200, "data.max_length": 128, "train.batch_size": 16,
    "train.lr": 1e-3, "train.head_lr": 1e-3, "federation.rounds": 2, "ranks.samples": 16,
    "split.min_cut": 1,
}


def participation(args: argparse.Namespace) -> None:
    rows = []
    for label, extra in (("no split", {"split.enabled": "never"}),
                         ("split auto", {"split.enabled": "auto"})):
        got = _run({**PARTICIPATION, "seed": args.seed, **extra})
        s = got["summary"]
        trained = [c["client"] for c in s["clients"] if c.get("steps")]
        accs = [c["global_accuracy"] for c in s["clients"]]
        row = {"variant": label, "seed": args.seed, "devices": got["devices"],
               "excluded": got["excluded"], "split": got["split"], "cuts": got["cuts"],
               "trained": trained, "num_clients": len(s["clients"]),
               "accuracy_all_clients": sum(accs) / len(accs), "tasks": {
                   t: v["global_accuracy"] for t, v in s["tasks"].items()},
               "bytes_per_round": got["bytes_per_round"], "wall": got["wall"],
               "cpu_over_wall": got["cpu_over_wall"]}
        rows.append(row)
        _append("split_participation_cpu.jsonl", {**row, "settings": PARTICIPATION})
        print(json.dumps({k: v for k, v in row.items() if k != "bytes_per_round"}), flush=True)
    print(f"\n{'variant':<12}{'trained':>9}{'acc (all)':>11}{'wall s':>8}  bytes/round by kind")
    for r in rows:
        kinds = ", ".join(f"{k} {v / MIB:.2f} MiB" for k, v in r["bytes_per_round"].items() if v)
        print(f"{r['variant']:<12}{len(r['trained']):>5}/{r['num_clients']:<3}"
              f"{r['accuracy_all_clients']:>11.4f}{r['wall']:>8.0f}  {kinds}")


def quick(args: argparse.Namespace) -> None:
    config = str(Path(__file__).parents[1] / "configs" / "quick.yaml")
    for seed in args.seeds:
        for dtype in args.dtypes:
            got = _run({"method": "homolora", "split.enabled": "always",
                        "ranks.aggregation": "zero-pad", "split.activation_dtype": dtype,
                        "seed": seed}, config)
            s = got["summary"]
            row = {"seed": seed, "dtype": dtype, "avg_accuracy": s["average"]["global_accuracy"],
                   "avg_metric": s["average"]["global_metric"],
                   "tasks": {t: v["global_accuracy"] for t, v in s["tasks"].items()},
                   "cuts": got["cuts"], "bytes_per_round": got["bytes_per_round"],
                   "wall": got["wall"], "cpu_over_wall": got["cpu_over_wall"]}
            _append("split_quick_cpu.jsonl", row)
            act = sum(v for k, v in got["bytes_per_round"].items()
                      if k.endswith(("activations", "activation_grads", "labels"))
                      and "eval" not in k)
            print(f"seed {seed} {dtype}: accuracy {row['avg_accuracy']:.4f} metric "
                  f"{row['avg_metric']:.4f}, training activation bytes/round "
                  f"{act / MIB:.1f} MiB, wall {got['wall']:.0f} s "
                  f"(cpu/wall {got['cpu_over_wall']:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cut", type=int, default=3)
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p = sub.add_parser("equivalence")
    p.add_argument("--models", nargs="+",
                   default=["tiny-bert", "tiny-gpt2", "tiny-llama", "minilm"])
    p = sub.add_parser("memory")
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    p.add_argument("--cuts", type=int, nargs="*", default=[])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p = sub.add_parser("memory-child")
    for name in ("--model",):
        p.add_argument(name)
    for name in ("--cut", "--batch", "--seq", "--steps"):
        p.add_argument(name, type=int)
    p = sub.add_parser("participation")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"])
    args = parser.parse_args()
    if args.part == "memory-child":
        print(json.dumps(memory_child(args)))
        return
    {"steps": steps, "equivalence": equivalence, "memory": memory,
     "participation": participation, "quick": quick}[args.part](args)


if __name__ == "__main__":
    main()
