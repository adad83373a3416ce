"""Decoding speed of pruned models against their dense source, measured so that a loaded machine hurts less.

Run: ``python -m bench.pruned_sampling [--checkpoints image64,audio12k] [--densities 1,0.5,0.25] [--block 32]
[--rounds 5] [--steps 64]``. Prints a table; the LAST line printed is one line of JSON.

Method: each checkpoint and its copies pruned to each density (models.prune.prune_model, feed-forward
layers, blocks of --block) decode with the compiled step on ONE thread (no barriers for other processes'
load to stall), from the middle of the sequence, batch 1 and 8. The models take turns, --rounds rounds of
--steps positions each, and each keeps its best round, timed in this process's CPU seconds (time.process_time:
the time the CPU spent on it, not the time it waited for a core). Tokens per CPU-second is then comparable
between models on a shared machine; it is not the wall-clock rate of bench.sample.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import cpu_name, print_table, sig
from models import load_model
from models.prune import prune_model
from sampling import Decoder, SamplingOptions


def decoders(models: list[tuple[str, torch.nn.Module]], batch: int) -> list[tuple[str, Decoder, torch.Tensor,
                                                                                  torch.Tensor, int]]:
    """(label, decoder, tokens, uniforms, start) per model, warmed 32 positions before the middle."""
    out = []
    for label, model in models:
        n = model.cfg.seq_len
        decoder = Decoder(model, batch, step="compiled")
        tokens, uniforms = torch.zeros(batch, n, dtype=torch.long), torch.rand(batch, n)
        decoder.sample(tokens, uniforms, SamplingOptions(), n // 2 - 32, n // 2)
        out.append((label, decoder, tokens, uniforms, n // 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default="image64,audio12k", help="comma-separated names in checkpoints/")
    p.add_argument("--densities", default="1,0.5,0.25", help="comma-separated feed-forward densities")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.checkpoints.split(","):
        dense = load_model(f"checkpoints/{name}")
        models = [(name, dense)] + [(f"{name} pruned {d:g}", prune_model(dense, d, args.block))
                                    for d in map(float, args.densities.split(","))]
        rates = {}
        for batch in (1, 8):
            runs = decoders(models, batch)
            best = dict.fromkeys((label for label, *_ in runs), 0.0)
            for _ in range(args.rounds):
                for label, decoder, tokens, uniforms, start in runs:
                    t0 = time.process_time()
                    decoder.sample(tokens, uniforms, SamplingOptions(), start, start + args.steps)
                    best[label] = max(best[label], batch * args.steps / (time.process_time() - t0))
            for label, rate in best.items():
                rates.setdefault(label, {})[batch] = rate
        for label, model in models:
            r = rates[label]
            rows.append({"model": label, "params_m": model.num_parameters() / 1e6, "tokens_per_cpu_s_b1": r[1],
                         "tokens_per_cpu_s_b8": r[8], "speedup_b1": r[1] / rates[name][1],
                         "speedup_b8": r[8] / rates[name][8]})
    print(f"CPU: {cpu_name()}, 1 thread, torch {torch.__version__}; block {args.block}, best of {args.rounds} "
          f"rounds of {args.steps} positions")
    print_table("Compiled decoding step, tokens per CPU-second (fp32, from the middle of the sequence)",
                ["model", "params", "b=1", "b=1 vs dense", "b=8", "b=8 vs dense"],
                [[r["model"], f"{r['params_m']:.2f}M", f"{r['tokens_per_cpu_s_b1']:,.0f}", f"{r['speedup_b1']:.2f}x",
                  f"{r['tokens_per_cpu_s_b8']:,.0f}", f"{r['speedup_b8']:.2f}x"] for r in rows])
    print(json.dumps({"cpu": cpu_name(), "block": args.block,
                      "rows": [{k: sig(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()
