"""Benchmark sampling: tokens/s at batch 1 and 8, a half-image completion, a 65,536-sample clip.

Run: ``python -m bench.sample [--quick] [--checkpoints DIR] [--models A,B] [--prune 1,0.5,0.25 [--prune-block 32]]
[--steady-only]``. Prints a table per model; the LAST line printed is one line of JSON.

Models: every checkpoint in --checkpoints; when there is none of a kind, the named config the
shipped model of that kind uses (image-cpu / audio-cpu) with untrained weights, labelled so
(decoding speed does not depend on the weights' values). --models keeps only the named ones. --prune adds,
for each dense model, a row per density: the model pruned by block magnitude (models.prune.prune_model; feed-
forward layers, blocks of --prune-block), labelled "NAME pruned D". --steady-only times only the tokens/s of
the two steps (no dense cache, naive, half image or clip rows).
Rows (fp32 compute on the CPU, the decoder's default caches (bfloat16), all of torch's threads; sampling by the
model card's defaults, what a user gets:
temperature, top-k, top-p; an untrained model at temperature 1, a pruned one by its source's card):
  * ours: KV-cached decoding (sampling.generate) with the compiled C step (sampling/compiled_step.py):
    steady tokens/s (the median of 3 runs of 256 steps) at a position past the first half, batch 1
    and 8 (per-sample seeds), and the wall time of a half-image completion (6,144 tokens after a
    32-row prompt: prefill included) and of a 65,536-sample clip from scratch (--quick: 4,096
    samples, scaled up and marked "est.").
  * PyTorch step: the same decoder stepping through PyTorch ops (weights split into one shard per
    thread), as it runs where no C compiler is found.
  * dense cache: the decoder with every layer caching and reading every past token.
  * naive: the full forward over the whole prefix for every new token (batch 1, 8 steps).
  * limit: per step, weight bytes (read once for the batch, as the compiled step reads them: bfloat16
    for a model stored in bfloat16) + cache bytes read (as the caches hold them: bfloat16 by default),
    and model FLOPs,
    against the speed of reading a buffer of that many bytes (the fastest of its sums over 0.3 s, from the
    CPU's caches when it fits: the weights of the shipped models do) and the fp32 matmul peak (the best of 3
    measurements);
    tokens/s = batch / max(bytes/bw, flops/peak), at batch 1 and 8. Their ratio is the most that
    batching can gain when every step is bound by memory or compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import CpuContention, cpu_name, fmt, print_table, sig
from models import SparseTransformer, config_for, load_card, load_model, model_kind
from models.flops import device_peak_flops, matmul_parameters
from models.prune import prune_model
from sampling import Decoder, SamplingOptions, card_defaults, generate

STEPS, RUNS = 256, 3
PROBE_SECONDS = 0.3  # how long read_bandwidth reads its buffer


def memory_bandwidth() -> float:
    """Bytes/s of a 256 MB copy (read + write), best of 3."""
    a, b = torch.randn(32 * 1024 * 1024), torch.empty(32 * 1024 * 1024)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def read_bandwidth(nbytes: int, seconds: float = PROBE_SECONDS) -> float:
    """Bytes/s of reading (summing) a buffer of ``nbytes``: the fastest of its sums over ``seconds`` (at least 5),
    from the CPU's caches when it fits (the first sums after a pause run slow: a handful of them understates it,
    docs/benchmarks.md)."""
    a = torch.randn(max(1, nbytes // 4))
    a.sum()
    best, sums, end = float("inf"), 0, time.perf_counter() + seconds
    while sums < 5 or time.perf_counter() < end:
        t0 = time.perf_counter()
        a.sum()
        best, sums = min(best, time.perf_counter() - t0), sums + 1
    return a.numel() * 4 / best


def matmul_peak(tries: int = 3) -> float:
    """FLOP/s of fp32 matmuls on torch's threads: the best of ``tries`` runs of models.flops.device_peak_flops (one
    run alone can land far below the others on a shared VM)."""
    return max(device_peak_flops("cpu", torch.float32)[0] for _ in range(tries))


def steady_tokens_per_s(model: SparseTransformer, batch: int, options: SamplingOptions, dense: bool = False,
                        start: int | None = None, step: str = "auto") -> dict:
    """Decode STEPS tokens from position ``start`` (caches pre-filled with zeros there), sampling by
    ``options``; the median rate of RUNS such runs (this VM's speed drifts from second to second)."""
    n = model.cfg.seq_len
    start = n // 2 if start is None else start
    decoder = Decoder(model, batch, dense=dense, step=step)
    tokens = torch.zeros(batch, n, dtype=torch.long)
    uniforms = torch.rand(batch, n)
    warm = max(64, decoder.step.tuning_positions)  # and the compiled step's grouping measured
    decoder.sample(tokens, uniforms, options, start - warm, start)
    rates = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        decoder.sample(tokens, uniforms, options, start, start + STEPS)
        rates.append(batch * STEPS / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.median(rates), "cache_bytes": decoder.cache_bytes,
            "cache_element_bytes": decoder.caches[0].kv.element_size(), "step": decoder.step.description,
            "weight_bytes": getattr(decoder.step, "weight_bytes", None)}


def naive_tokens_per_s(model: SparseTransformer, prefix: int, steps: int = 8) -> float:
    """Full forward over the prefix for each new token (what a cache-less sampler does)."""
    tokens = torch.zeros(1, prefix + steps, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        for pos in range(prefix, prefix + steps):
            logits = model(tokens[:, : pos + 1])[:, -1]
            tokens[0, pos] = logits.argmax(-1)
    return steps / (time.perf_counter() - t0)


def timed_generate(model: SparseTransformer, prompt_len: int, length: int, options: SamplingOptions) -> float:
    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in generate(model, prompt, length, [0], options, report_every=length):
        pass
    return time.perf_counter() - t0


def step_cost(model: SparseTransformer, cache_read_per_token: float, batch: int = 1,
              weight_bytes: int | None = None, *, cache_element_bytes: int) -> tuple[float, float]:
    """(bytes moved, FLOPs) of one step: every weight once plus each sequence's cache entries read.
    weight_bytes: the weight bytes the step reads (the compiled step's, bfloat16 where it reads bfloat16);
    default every matrix of the model as stored. cache_element_bytes: the bytes of one cached value, as the
    decoder that ran holds them (2 for bfloat16 caches, 4 for float32)."""
    cfg = model.cfg
    if weight_bytes is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)
    kv_bytes = cache_read_per_token * 2 * cfg.d_model * cache_element_bytes
    flops = 2 * matmul_parameters(cfg) + 4 * cfg.d_model * cache_read_per_token
    return weight_bytes + batch * kv_bytes, batch * flops


def keys_read_per_step(model: SparseTransformer, pos: int) -> float:
    """Cache entries (per head) all layers read at position ``pos``."""
    cfg = model.cfg
    return sum(cfg.layer_pattern(layer).keys_read(pos) for layer in range(cfg.n_layers))


def models_to_time(folder: Path, names: list[str] | None = None, densities: list[float] = (),
                   block: int = 32) -> list[tuple[str, SparseTransformer, SamplingOptions]]:
    """(label, model, the card's sampling defaults) for each checkpoint in ``folder`` (only ``names`` if given),
    or an untrained model (temperature 1) of a kind none is of; then each dense one pruned to each of
    ``densities``."""
    found = []
    for card in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            fields = load_card(card)
        except ValueError:
            continue
        if names is None or card.stem in names:
            model = load_model(card.with_suffix(""))
            if isinstance(model, SparseTransformer):  # the LSTM baseline has no KV cache or compiled step to time
                found.append((card.stem, model, card_defaults(fields)))
    kinds = {model_kind(m) for _, m, _ in found}
    for kind in ("image", "audio") if names is None else ():
        if kind not in kinds:
            model = SparseTransformer(config_for(kind, f"{kind}-cpu")).eval()
            found.append((f"{kind}-cpu (untrained)", model, SamplingOptions()))
    pruned = [(f"{name} pruned {density:g}", prune_model(model, density, block), options)
              for name, model, options in found if model.cfg.ff_layout == "dense" for density in densities]
    return found + pruned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="estimate the 65,536-sample clip from 4,096 samples")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--models", type=lambda t: t.split(","), help="comma-separated checkpoint names (default all)")
    p.add_argument("--prune", type=lambda t: [float(x) for x in t.split(",")], default=[],
                   help="comma-separated densities: add each dense model pruned to them")
    p.add_argument("--prune-block", type=int, default=32, help="block size of --prune (default 32)")
    p.add_argument("--steady-only", action="store_true", help="time only the steady tokens/s rows")
    args = p.parse_args()
    bandwidth = memory_bandwidth()
    peak = matmul_peak()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; memory "
          f"{bandwidth / 1e9:.1f} GB/s (copy), fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    contention = CpuContention()
    results = []
    for name, model, options in models_to_time(Path(args.checkpoints), args.models, args.prune, args.prune_block):
        kind, n = model_kind(model), model.cfg.seq_len
        torch.manual_seed(0)
        r = {"model": name, "kind": kind, "params_m": model.num_parameters() / 1e6,
             "sampling": vars(options)}
        b1, b8 = steady_tokens_per_s(model, 1, options), steady_tokens_per_s(model, 8, options)
        r.update(tokens_per_s_b1=b1["tokens_per_s"], tokens_per_s_b8=b8["tokens_per_s"],
                 cache_bytes_b1=b1["cache_bytes"], cache_element_bytes=b1["cache_element_bytes"], step=b1["step"],
                 step_b8=b8["step"])
        torch_b1, torch_b8 = (steady_tokens_per_s(model, b, options, step="pytorch") for b in (1, 8))
        r.update(torch_tokens_per_s_b1=torch_b1["tokens_per_s"], torch_tokens_per_s_b8=torch_b8["tokens_per_s"],
                 torch_step=torch_b1["step"])
        if not args.steady_only:
            r["dense_tokens_per_s_b1"] = steady_tokens_per_s(model, 1, options, dense=True)["tokens_per_s"]
            r["naive_tokens_per_s_b1"] = naive_tokens_per_s(model, n // 2)
        if kind == "image" and not args.steady_only:
            r["half_image_s"] = timed_generate(model, n // 2, n, options)
        if kind == "audio" and not args.steady_only:
            clip = min(n, 65536)
            if args.quick:
                r["clip_s"], r["clip_estimated"] = timed_generate(model, 0, 4096, options) * clip / 4096, True
            else:
                r["clip_s"], r["clip_estimated"] = timed_generate(model, 0, clip, options), False
        keys = keys_read_per_step(model, n // 2)
        bytes_step, flops_step = step_cost(model, keys, 1, b1["weight_bytes"],
                                           cache_element_bytes=b1["cache_element_bytes"])
        bytes_b8, flops_b8 = step_cost(model, keys, 8, b8["weight_bytes"],
                                       cache_element_bytes=b8["cache_element_bytes"])
        bw1, bw8 = read_bandwidth(bytes_step), read_bandwidth(bytes_b8)
        r.update(step_bytes=bytes_step, step_flops=flops_step, step_bytes_b8=bytes_b8,
                 read_bandwidth_gbs_b1=bw1 / 1e9, read_bandwidth_gbs_b8=bw8 / 1e9,
                 limit_tokens_per_s=1 / max(bytes_step / bw1, flops_step / peak),
                 limit_tokens_per_s_b8=8 / max(bytes_b8 / bw8, flops_b8 / peak))
        results.append(r)
    busy = contention.other_cores()
    print_table("Sampling on the CPU (fp32 compute, the decoder's default caches; tokens/s at a position past the "
                "middle of the sequence)",
                ["model", "params", "b=1 tok/s", "b=8 tok/s", "b8/b1", "PyTorch step b=1", "PyTorch step b=8",
                 "dense cache b=1", "naive b=1", "half image", "65,536 clip", "cache (b=1)", "limit b=1",
                 "limit b=8"],
                [[r["model"], f"{r['params_m']:.1f}M", fmt(r["tokens_per_s_b1"], ",.0f"),
                  fmt(r["tokens_per_s_b8"], ",.0f"), fmt(r["tokens_per_s_b8"] / r["tokens_per_s_b1"], ".1f"),
                  fmt(r["torch_tokens_per_s_b1"], ",.0f"), fmt(r["torch_tokens_per_s_b8"], ",.0f"),
                  fmt(r.get("dense_tokens_per_s_b1"), ",.0f"), fmt(r.get("naive_tokens_per_s_b1"), ",.1f"),
                  fmt(r.get("half_image_s"), ".1f") + (" s" if "half_image_s" in r else ""),
                  "-" if "clip_s" not in r else fmt(r["clip_s"], ".1f") + (" s est." if r["clip_estimated"] else " s"),
                  f"{r['cache_bytes_b1'] / 1e6:.1f} MB", fmt(r["limit_tokens_per_s"], ",.0f"),
                  fmt(r["limit_tokens_per_s_b8"], ",.0f")] for r in results])
    for r in results:
        rule = ", ".join(f"{k} {v:g}" for k, v in r["sampling"].items() if v is not None)
        print(f"{r['model']} (sampling: {rule}): per step {r['step_bytes'] / 1e6:.1f} MB moved at batch 1 (read at "
              f"{r['read_bandwidth_gbs_b1']:.0f} GB/s), {r['step_bytes_b8'] / 1e6:.1f} MB at batch 8 (at "
              f"{r['read_bandwidth_gbs_b8']:.0f} GB/s; caches of {r['cache_element_bytes']}-byte values); "
              f"{r['step_flops'] / 1e6:.1f} MFLOP per token; "
              f"{r['step']} (batch 8: {r['step_b8']}); PyTorch rows: {r['torch_step']}")
    if busy is not None:
        print(f"(other processes used {busy:.2f} cores on average while this ran)")
    print("GPU: " + ("not timed by this script yet" if torch.cuda.is_available() else "none here"))
    print(json.dumps({"cpu": cpu_name(), "bandwidth_gbs": sig(bandwidth / 1e9), "other_cores_busy": sig(busy, 2),
                      "rows": [{k: sig(v) if isinstance(v, float) else v for k, v in r.items()} for r in results]}))


if __name__ == "__main__":
    main()
