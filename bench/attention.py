"""Benchmark the block-sparse attention kernels on the Sparse Transformer's local + strided "pair".

Run: ``python -m bench.attention [--quick] [--ns 3072,12288,65536] [--no-flex] [--repeats R] [--malloc-defaults]``;
on a GPU machine ``python -m bench.attention --gpu-only [--gpu-ns 16384,65536] [--json-out PATH]`` runs the GPU
rows alone.
Prints readable tables; the LAST line printed is one line of JSON with the headline figures.

What is measured (CPU, unless --gpu-only; B=1, H=4, D=64, float32, causal), with glibc's malloc set as train.py
sets it on the CPU (training/memory.py: freed blocks are kept, not returned and faulted in again),
for every variant alike; --malloc-defaults leaves the allocator at its defaults:
  * Layout build: median wall time of ``make_layout`` for the local and strided patterns, blocks 32 and 64.
  * For each N, forward and forward+backward wall time (median of --repeats after one warm-up call) of
      - dense causal SDPA (``F.scaled_dot_product_attention(is_causal=True)``), one layer; for N > 32768
        it runs once with no warm-up (about a minute), and is skipped under --quick;
      - a naive PyTorch pair written out here: local = queries chunked by l, each chunk attending to its own
        and the previous chunk through a dense masked softmax; strided = the [N/l, l] view transposed, then
        dense causal SDPA down each column; both differentiated by autograd;
      - ours: ``kernels.attention`` (CPU backend) on a local layout (window=l) and a strided one (stride=l),
        with blocks 32 and 64; the faster block (forward+backward) is the one reported.
    l = 192 when N % 192 == 0 (one row of a 64x64x3 image at N=12,288), else 256.
    Per layer = pair time / 2; speed-up per layer = dense time / per-layer time.
  * FlexAttention at N=12,288 (skipped by --no-flex and --quick): ``torch.compile(flex_attention)`` on the
    CPU, forward only (it has no CPU backward), with ``create_block_mask`` (BLOCK_SIZE 128) for the local
    and the strided mask_mods: block-mask build, first call (includes compiling, with inductor's caches
    off) and steady forward, against our forward for the same pattern.
GPU (only when CUDA is available): B=1, H=16, bfloat16, D in (64, 128), N in --gpu-ns (default --ns),
``triton.testing.do_bench`` medians of forward and forward+backward, per pattern (local, strided) and for the
pair: ours (Triton backend, blocks 64 and 128; the faster one per pattern is compared), dense causal SDPA
restricted to the flash backend, and ``torch.compile(flex_attention)`` with BlockMasks of the same mask_mods
(built once per N by ``torch.compile(create_block_mask)``, so no N x N temporary; shared by both head dims),
and Flex's FLASH backend where this torch offers it. Speed-up = Flex time / ours; the targets (issue 29) are
>= 1.5x Flex on the same pattern, forward and forward+backward, at N = 16,384 and 65,536.

FLOP counting. Ours and Flex are counted on the blocks they compute (masked entries of partial blocks
included): forward = 4 * D * computed score entries * B (QK^T and PV, 2 FLOPs per multiply-add), from
``Layout.computed_scores()`` (all heads) or the BlockMask's block counts; backward = 2.5 x forward, so
forward+backward = 3.5 x forward. Dense causal attention is counted on the causal half: N^2 / 2 scores per head.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import (
    CpuContention,
    cpu_name,
    error_text,
    fmt,
    median_time,
    print_table,
    ratio,
    sig,
    write_json_atomic,
)
from kernels import attention, make_layout
from training.memory import keep_freed_memory

B, H, D = 1, 4, 64  # CPU problem: batch, heads, head dim
CPU_BLOCKS = (32, 64)
BIG_N = 32768  # above this, dense SDPA runs once without warm-up (and not at all under --quick)
LAYOUT_REPEATS = 7
FLEX_N = 12288
GPU_B, GPU_H = 1, 16
GPU_HEAD_DIMS = (64, 128)
GPU_BLOCKS = (64, 128)
BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --- helpers -------------------------------------------------------------------------------------------------


def ell_for(n: int) -> int:
    """The pattern's period l: an image row (192) when it divides N, else 256 (audio-like lengths)."""
    return 192 if n % 192 == 0 else 256


def inputs(n: int, heads: int, d: int, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """q, k, v and an output gradient, [B, heads, n, d] (drawn on ``device``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, heads, n, d, generator=g, device=device).to(dtype) for _ in range(4)]


def time_fwd_bwd(fn: Attn, q, k, v, dout, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(forward s, forward+backward s): forward under no_grad, backward through autograd."""
    with torch.no_grad():
        fwd = median_time(lambda: fn(q, k, v), repeats, warmup)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def step() -> None:
        for t in (qg, kg, vg):
            t.grad = None
        fn(qg, kg, vg).backward(dout)

    return fwd, median_time(step, repeats, warmup)


def layer_flops(layout, batch: int, d: int) -> float:
    """Forward FLOPs of one layer on the layout's computed blocks (all heads)."""
    return 4.0 * d * layout.computed_scores() * batch


def dense_causal_flops(n: int, heads: int, d: int, batch: int) -> float:
    return 4.0 * d * (n * n / 2) * heads * batch


# --- the attention variants ----------------------------------------------------------------------------------


def dense_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def naive_local(q, k, v, ell: int):
    """Local pattern (i - l <= j <= i): chunks of l queries read their chunk and the previous one."""
    b, h, n, d = q.shape
    c = -(-n // ell)
    pad = c * ell - n
    q, k, v = (F.pad(t, (0, 0, 0, pad)).view(b, h, c, ell, d) for t in (q, k, v))
    k2, v2 = (torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t], 3) for t in (k, v))  # [b, h, c, 2l, d]
    i = torch.arange(c)[:, None, None] * ell + torch.arange(ell)[None, :, None]
    j = (torch.arange(c)[:, None, None] - 1) * ell + torch.arange(2 * ell)[None, None, :]
    allowed = (j <= i) & (j >= i - ell) & (j >= 0)  # [c, l, 2l]
    s = (q @ k2.transpose(-1, -2)) * d**-0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return (p @ v2).reshape(b, h, c * ell, d)[:, :, :n]


def naive_strided(q, k, v, ell: int):
    """Strided pattern ((i - j) % l == 0, j <= i): dense causal SDPA down each column of the [N/l, l] view."""
    b, h, n, d = q.shape
    r = -(-n // ell)
    pad = r * ell - n
    cols = [F.pad(t, (0, 0, 0, pad)).view(b, h, r, ell, d).transpose(2, 3) for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*cols, is_causal=True)  # [b, h, l, r, d]
    return o.transpose(2, 3).reshape(b, h, r * ell, d)[:, :, :n]


def pair_layouts(n: int, block: int, heads: int) -> dict:
    ell = ell_for(n)
    return {"local": make_layout("local", n, block, heads=heads, window=ell),
            "strided": make_layout("strided", n, block, heads=heads, stride=ell)}


def ours(layout, backend: str = "cpu") -> Attn:
    return lambda q, k, v: attention(q, k, v, layout, backend=backend)


def local_mask_mod(ell: int):
    def local(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= ell) & (kv_idx <= q_idx)

    return local


def strided_mask_mod(ell: int):
    def strided(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx) % ell == 0) & (kv_idx <= q_idx)

    return strided


MASK_MODS = {"local": local_mask_mod, "strided": strided_mask_mod}


# --- CPU -----------------------------------------------------------------------------------------------------


def layout_build_times(ns: list[int]) -> dict:
    """Median make_layout time (ms) per N, kind and block; prints a table."""
    out, rows = {}, []
    for n in ns:
        ell = ell_for(n)
        for block in CPU_BLOCKS:
            for kind, kw in (("local", {"window": ell}), ("strided", {"stride": ell})):
                build = partial(make_layout, kind, n, block, heads=H, **kw)
                ms = 1e3 * median_time(build, LAYOUT_REPEATS)
                out.setdefault(f"N{n}", {})[f"{kind}_b{block}"] = sig(ms)
                rows.append([str(n), str(ell), kind, str(block), f"{ms:.3f}"])
    print_table(f"Layout build (make_layout, median of {LAYOUT_REPEATS}; target < 10 ms at N=65,536)",
                ["N", "l", "kind", "block", "ms"], rows)
    return out


def measure_pair(fns: dict[str, Attn], q, k, v, dout, repeats: int) -> dict:
    """Per-layer and pair (local + strided) fwd / fwd+bwd times."""
    res = {}
    for kind, fn in fns.items():
        res[f"{kind}_fwd_s"], res[f"{kind}_fwd_bwd_s"] = time_fwd_bwd(fn, q, k, v, dout, repeats)
    res["pair_fwd_s"] = res["local_fwd_s"] + res["strided_fwd_s"]
    res["pair_fwd_bwd_s"] = res["local_fwd_bwd_s"] + res["strided_fwd_bwd_s"]
    return res


def max_diff(fns_a: dict[str, Attn], fns_b: dict[str, Attn], q, k, v) -> float:
    with torch.no_grad():
        return max(float((fns_a[kind](q, k, v) - fns_b[kind](q, k, v)).abs().max()) for kind in fns_a)


def cpu_at(n: int, repeats: int, quick: bool) -> dict:
    """All CPU measurements at one sequence length; prints its table and returns the JSON record."""
    ell = ell_for(n)
    q, k, v, dout = inputs(n, H, D)
    dense = None
    if not (quick and n > BIG_N):
        big = n > BIG_N
        dense = time_fwd_bwd(dense_sdpa, q, k, v, dout, 1 if big else repeats, warmup=0 if big else 1)
    naive_fns = {"local": lambda q, k, v: naive_local(q, k, v, ell),
                 "strided": lambda q, k, v: naive_strided(q, k, v, ell)}
    naive = measure_pair(naive_fns, q, k, v, dout, repeats)
    per_block = {}
    for block in CPU_BLOCKS:
        layouts = pair_layouts(n, block, H)
        fns = {kind: ours(lay) for kind, lay in layouts.items()}
        res = measure_pair(fns, q, k, v, dout, repeats)
        res["flops_fwd"] = sum(layer_flops(lay, B, D) for lay in layouts.values())
        res["density"] = {kind: lay.density() for kind, lay in layouts.items()}
        res["max_abs_diff_vs_naive"] = max_diff(fns, naive_fns, q, k, v)
        per_block[block] = res
    best = min(CPU_BLOCKS, key=lambda b: per_block[b]["pair_fwd_bwd_s"])
    record = cpu_record(n, ell, dense, naive, per_block, best)
    print_cpu_table(n, ell, dense, naive, per_block, best)
    return record


def cpu_record(n: int, ell: int, dense, naive: dict, per_block: dict, best: int) -> dict:
    o = per_block[best]
    dense_fwd, dense_fb = dense if dense else (None, None)
    return {
        "N": n, "l": ell, "block": best,
        "dense_sdpa_fwd_s": sig(dense_fwd), "dense_sdpa_fwd_bwd_s": sig(dense_fb),
        "naive_pair_fwd_s": sig(naive["pair_fwd_s"]), "naive_pair_fwd_bwd_s": sig(naive["pair_fwd_bwd_s"]),
        "pair_fwd_s": sig(o["pair_fwd_s"]), "pair_fwd_bwd_s": sig(o["pair_fwd_bwd_s"]),
        "local_fwd_s": sig(o["local_fwd_s"]), "local_fwd_bwd_s": sig(o["local_fwd_bwd_s"]),
        "strided_fwd_s": sig(o["strided_fwd_s"]), "strided_fwd_bwd_s": sig(o["strided_fwd_bwd_s"]),
        "per_layer_fwd_bwd_s": sig(o["pair_fwd_bwd_s"] / 2),
        "speedup_per_layer": sig(ratio(dense_fb, o["pair_fwd_bwd_s"] / 2), 3),
        "speedup_per_layer_fwd": sig(ratio(dense_fwd, o["pair_fwd_s"] / 2), 3),
        "speedup_vs_naive_fwd_bwd": sig(ratio(naive["pair_fwd_bwd_s"], o["pair_fwd_bwd_s"]), 3),
        "gflops_fwd": sig(o["flops_fwd"] / o["pair_fwd_s"] / 1e9, 3),
        "gflops_fwd_bwd": sig((1 + BWD_FACTOR) * o["flops_fwd"] / o["pair_fwd_bwd_s"] / 1e9, 3),
        "density": {kind: sig(x, 3) for kind, x in o["density"].items()},
        "max_abs_diff_vs_naive": sig(o["max_abs_diff_vs_naive"], 2),
        "pair_fwd_bwd_s_by_block": {str(b): sig(r["pair_fwd_bwd_s"]) for b, r in per_block.items()},
    }


def print_cpu_table(n: int, ell: int, dense, naive: dict, per_block: dict, best: int) -> None:
    dense_fwd, dense_fb = dense if dense else (None, None)

    def row(name: str, fwd: float, fb: float, layers: int, gflop: float | None = None) -> list[str]:
        per_fwd, per_fb = fwd / layers, fb / layers
        gf = [fmt(gflop / fwd / 1e9, ".1f"), fmt((1 + BWD_FACTOR) * gflop / fb / 1e9, ".1f")] if gflop else ["-"] * 2
        return [name, f"{fwd:.4f}", f"{fb:.4f}", f"{per_fb:.4f}", fmt(ratio(dense_fwd, per_fwd), ".1f"),
                fmt(ratio(dense_fb, per_fb), ".1f"), *gf]

    rows = []
    if dense:
        rows.append(row("dense causal SDPA (1 layer)", dense_fwd, dense_fb, 1, dense_causal_flops(n, H, D, B)))
    else:
        rows.append(["dense causal SDPA (1 layer)", "skipped", "skipped", "-", "-", "-", "-", "-"])
    for kind in ("local", "strided"):
        rows.append(row(f"naive {kind}", naive[f"{kind}_fwd_s"], naive[f"{kind}_fwd_bwd_s"], 1))
    rows.append(row("naive pair", naive["pair_fwd_s"], naive["pair_fwd_bwd_s"], 2))
    for block, r in per_block.items():
        mark = " *" if block == best else ""
        for kind in ("local", "strided"):
            rows.append(row(f"ours b{block} {kind}", r[f"{kind}_fwd_s"], r[f"{kind}_fwd_bwd_s"], 1))
        rows.append(row(f"ours b{block} pair{mark}", r["pair_fwd_s"], r["pair_fwd_bwd_s"], 2, r["flops_fwd"]))
    dens = per_block[best]["density"]
    print_table(f"CPU N={n:,}  l={ell}  B={B} H={H} D={D} fp32  density local {dens['local']:.4f}, strided "
                f"{dens['strided']:.4f}  (* = reported block; max |ours - naive| = "
                f"{per_block[best]['max_abs_diff_vs_naive']:.1e})",
                ["method", "fwd s", "fwd+bwd s", "per layer fwd+bwd s", "speed-up fwd", "speed-up fwd+bwd",
                 "GFLOP/s fwd", "GFLOP/s fwd+bwd"], rows)


def print_cpu_summary(records: dict) -> None:
    rows = [[f"{r['N']:,}", str(r["l"]), str(r["block"]), fmt(r["dense_sdpa_fwd_bwd_s"]),
             fmt(r["naive_pair_fwd_bwd_s"]), fmt(r["pair_fwd_bwd_s"]), fmt(r["per_layer_fwd_bwd_s"]),
             fmt(r["speedup_per_layer"]), fmt(r["speedup_vs_naive_fwd_bwd"]), fmt(r["gflops_fwd_bwd"])]
            for r in records.values()]
    print_table("CPU summary (fwd+bwd; speed-up per layer = dense / (pair / 2))",
                ["N", "l", "block", "dense s", "naive pair s", "ours pair s", "ours per layer s",
                 "speed-up/layer", "vs naive", "GFLOP/s"], rows)


# --- FlexAttention on the CPU --------------------------------------------------------------------------------


def flex_cpu(repeats: int) -> dict:
    """Compiled FlexAttention forward vs ours at N=FLEX_N on the CPU; never raises."""
    try:
        return _flex_cpu(repeats)
    except Exception as exc:  # inductor needs a C++ compiler; report rather than fail the benchmark
        reason = error_text(exc)
        print(f"\nFlexAttention (CPU): failed: {reason}")
        return {"error": reason}


def _flex_cpu(repeats: int) -> dict:
    import torch._inductor.config as inductor_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, ell = FLEX_N, ell_for(FLEX_N)
    q, k, v, _ = inputs(n, H, D)
    flex = torch.compile(flex_attention)
    out, rows = {}, []
    for kind, mask_mod in MASK_MODS.items():
        make_mask = partial(create_block_mask, mask_mod(ell), None, None, n, n, device="cpu")
        build = median_time(make_mask, repeats, warmup=0)
        bm = make_mask()
        with torch.no_grad(), inductor_config.patch(force_disable_caches=True):
            start = time.perf_counter()
            o_flex = flex(q, k, v, block_mask=bm)
            first = time.perf_counter() - start
            steady = median_time(partial(flex, q, k, v, block_mask=bm), repeats)
        fns = {block: ours(pair_layouts(n, block, H)[kind]) for block in CPU_BLOCKS}
        with torch.no_grad():
            ours_fwd = {block: median_time(partial(fn, q, k, v), repeats) for block, fn in fns.items()}
            best = min(ours_fwd, key=ours_fwd.get)
            diff = float((fns[best](q, k, v) - o_flex).abs().max())
        out[kind] = {"block_mask_build_s": sig(build), "first_call_s": sig(first), "steady_fwd_s": sig(steady),
                     "flex_block_density": sig(1 - bm.sparsity() / 100, 3), "ours_fwd_s": sig(ours_fwd[best]),
                     "ours_block": best, "flex_over_ours": sig(steady / ours_fwd[best], 3),
                     "max_abs_diff": sig(diff, 2)}
        rows.append([kind, f"{build:.3f}", f"{first:.2f}", f"{steady:.4f}", f"{1 - bm.sparsity() / 100:.3f}",
                     f"{ours_fwd[best]:.4f} (b{best})", f"{steady / ours_fwd[best]:.1f}x", f"{diff:.1e}"])
    print_table(f"FlexAttention vs ours, CPU forward, N={n:,} l={ell} (flex BLOCK_SIZE 128, torch.compile; "
                "first call includes compiling)",
                ["pattern", "block mask s", "first call s", "flex fwd s", "flex block density", "ours fwd s",
                 "flex / ours", "max |diff|"], rows)
    out["ours_local_le_flex_local"] = out["local"]["flex_over_ours"] >= 1
    out["ours_strided_ge_20x"] = out["strided"]["flex_over_ours"] >= 20
    print(f"targets: ours local fwd <= flex local fwd: {out['ours_local_le_flex_local']}; "
          f"ours strided >= 20x faster than flex strided: {out['ours_strided_ge_20x']}")
    return out


# --- GPU -----------------------------------------------------------------------------------------------------


def gpu_time(fn: Attn, q, k, v, dout) -> tuple[float, float]:
    """(forward s, forward+backward s), do_bench medians."""
    from triton.testing import do_bench

    def fwd() -> None:
        with torch.no_grad():
            fn(q, k, v)

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    fb = do_bench(lambda: fn(qg, kg, vg).backward(dout), grad_to_none=[qg, kg, vg], return_mode="median")
    return do_bench(fwd, return_mode="median") / 1e3, fb / 1e3


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def block_mask_flops(bm, d: int) -> float:
    """Forward FLOPs on the BlockMask's computed blocks, for a mask built with B=H=None (shared)."""
    q_bs, kv_bs = bm.BLOCK_SIZE
    blocks = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None
                                            else 0)
    return 4.0 * d * blocks * q_bs * kv_bs * GPU_B * GPU_H


def gpu_entry(fwd_bwd: tuple[float, float], flops_fwd: float) -> dict:
    fwd, fb = fwd_bwd
    return {"fwd_s": sig(fwd), "fwd_bwd_s": sig(fb), "tflops_fwd": sig(flops_fwd / fwd / 1e12, 3),
            "tflops_fwd_bwd": sig((1 + BWD_FACTOR) * flops_fwd / fb / 1e12, 3)}


def gpu_kinds(fns: dict[str, Attn], flops: dict[str, float], q, k, v, dout) -> dict:
    """Each pattern on its own, and the local + strided pair (times and FLOPs summed over the two layers)."""
    times = {kind: gpu_time(fns[kind], q, k, v, dout) for kind in ("local", "strided")}
    res = {kind: gpu_entry(times[kind], flops[kind]) for kind in times}
    res["pair"] = gpu_entry((sum(t[0] for t in times.values()), sum(t[1] for t in times.values())),
                            sum(flops.values()))
    return res


def compiled_mask_builder():
    """create_block_mask compiled, so that no N x N temporary exists (torch.compile(create_block_mask), as
    torch 2.5+ documents; the _compile=True flag of older releases is deprecated in 2.13)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def flex_masks(n: int, build) -> dict:
    """The local and strided BlockMasks at length n (BLOCK_SIZE 128, shared by batch and heads), or an error."""
    try:
        masks = {kind: build(mm(ell_for(n)), None, None, n, n, device="cuda") for kind, mm in MASK_MODS.items()}
        torch.cuda.synchronize()
        return masks
    except Exception as exc:
        return {"error": error_text(exc)}


def gpu_at(n: int, d: int, flex, masks: dict, flex_flash: dict) -> dict:
    """Every method at one (N, D); ``flex_flash`` remembers whether Flex's FLASH backend ran at all."""
    q, k, v, dout = inputs(n, GPU_H, d, device="cuda", dtype=torch.bfloat16)
    dense = gpu_entry(gpu_time(sdpa_flash, q, k, v, dout), dense_causal_flops(n, GPU_H, d, GPU_B))
    res = {"dense_sdpa_flash": {"local": dense, "strided": dense, "pair": gpu_entry(
        (2 * dense["fwd_s"], 2 * dense["fwd_bwd_s"]), 2 * dense_causal_flops(n, GPU_H, d, GPU_B))}}
    for block in GPU_BLOCKS:
        try:
            layouts = pair_layouts(n, block, GPU_H)
            fns = {kind: ours(lay, backend="triton") for kind, lay in layouts.items()}
            res[f"ours_b{block}"] = gpu_kinds(fns, {kind: layer_flops(lay, GPU_B, d) for kind, lay in layouts.items()},
                                              q, k, v, dout)
        except Exception as exc:  # reported, not fatal: the other block still runs
            res[f"ours_b{block}"] = {"error": error_text(exc)}
    if "error" in masks:
        res["flex"] = {"error": masks["error"]}
    else:
        flops = {kind: block_mask_flops(bm, d) for kind, bm in masks.items()}
        try:
            fns = {kind: (lambda q, k, v, bm=bm: flex(q, k, v, block_mask=bm)) for kind, bm in masks.items()}
            res["flex"] = gpu_kinds(fns, flops, q, k, v, dout)
        except Exception as exc:
            res["flex"] = {"error": error_text(exc)}
        if flex_flash.get("error") is None:  # FLASH backend (FlashAttention-4 kernels): tried until it fails once
            try:
                opts = {"BACKEND": "FLASH"}
                fns = {kind: (lambda q, k, v, bm=bm: flex(q, k, v, block_mask=bm, kernel_options=opts))
                       for kind, bm in masks.items()}
                res["flex_flash"] = gpu_kinds(fns, flops, q, k, v, dout)
            except Exception as exc:
                flex_flash["error"] = error_text(exc)
                res["flex_flash"] = {"error": flex_flash["error"]}
    # ours: the faster block per pattern; speed-up over Flex on the same pattern (Flex time / ours)
    best = {}
    for kind in ("local", "strided", "pair"):
        timed = [b for b in GPU_BLOCKS if "error" not in res[f"ours_b{b}"]]
        if timed:
            b = min(timed, key=lambda b: res[f"ours_b{b}"][kind]["fwd_bwd_s"])
            best[kind] = {"block": b, **res[f"ours_b{b}"][kind]}
    res["ours"] = best
    for other in ("flex", "flex_flash", "dense_sdpa_flash"):
        if other in res and "error" not in res[other]:
            res[f"speedup_vs_{other}"] = {
                kind: {"fwd": sig(res[other][kind]["fwd_s"] / e["fwd_s"], 3),
                       "fwd_bwd": sig(res[other][kind]["fwd_bwd_s"] / e["fwd_bwd_s"], 3)} for kind, e in best.items()}
    return res


def gpu_rows(d: int, n: int, res: dict) -> list[list[str]]:
    rows = []
    flex = res.get("flex", {})
    for name, per_kind in res.items():
        if not isinstance(per_kind, dict) or name == "ours" or name.startswith("speedup"):
            continue  # N, D, l, mask build time; summaries
        if "error" in per_kind:
            rows.append([str(d), f"{n:,}", name, "-", "error", per_kind["error"][:70], "", "", "", ""])
            continue
        for kind, e in per_kind.items():
            if name == "dense_sdpa_flash" and kind == "strided":
                continue  # one dense causal layer serves as both
            label = "causal" if name == "dense_sdpa_flash" and kind == "local" else kind
            vs = ["", ""]
            if name.startswith("ours") and kind in flex:
                vs = [f"{flex[kind]['fwd_s'] / e['fwd_s']:.2f}x", f"{flex[kind]['fwd_bwd_s'] / e['fwd_bwd_s']:.2f}x"]
            rows.append([str(d), f"{n:,}", name, label, f"{1e3 * e['fwd_s']:.3f}", f"{1e3 * e['fwd_bwd_s']:.3f}",
                         f"{e['tflops_fwd']:.1f}", f"{e['tflops_fwd_bwd']:.1f}", *vs])
    return rows


TARGET_NS, TARGET_SPEEDUP = (16384, 65536), 1.5  # issue 29: >= 1.5x Flex on the same pattern, fwd and fwd+bwd


def gpu_targets(out: dict) -> dict:
    """Per (N, D, pattern) at the target lengths: ours >= 1.5x Flex (fwd and fwd+bwd), and faster than Flex's
    FLASH backend where it ran."""
    met = {}
    for key, res in out.items():
        if not isinstance(res, dict) or "speedup_vs_flex" not in res or res.get("N") not in TARGET_NS:
            continue
        for kind in ("local", "strided"):
            s = res["speedup_vs_flex"].get(kind)
            entry = {"vs_flex_1.5x": bool(s and s["fwd"] >= TARGET_SPEEDUP and s["fwd_bwd"] >= TARGET_SPEEDUP)}
            f = res.get("speedup_vs_flex_flash", {}).get(kind)
            entry["vs_flex_flash_faster"] = bool(f and f["fwd"] >= 1 and f["fwd_bwd"] >= 1) if f else None
            met[f"{key}_{kind}"] = entry
    return met


def gpu_section(ns: list[int], json_out: str | None = None, record: dict | None = None) -> dict | None:
    """Ours (Triton) against dense SDPA (flash) and compiled FlexAttention with the same masks, bf16; masks are
    built once per N with the compiled builder and shared by both head dims. With ``json_out`` the record so
    far is rewritten after every (N, D), so that a run cut short keeps what it measured."""
    if not torch.cuda.is_available():
        print("\nGPU: not measured (no CUDA device)")
        return None
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "cache_size_limit"):  # one graph per (pattern, N, D): stay compiled
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    flex = torch.compile(flex_attention)
    build = compiled_mask_builder()
    out = {"device": torch.cuda.get_device_name(), "B": GPU_B, "H": GPU_H, "dtype": "bfloat16",
           "blocks": list(GPU_BLOCKS)}
    flex_flash: dict = {}
    for n in ns:
        start = time.perf_counter()
        masks = flex_masks(n, build)
        mask_s = time.perf_counter() - start
        for d in GPU_HEAD_DIMS:
            res = {"N": n, "D": d, "l": ell_for(n), "flex_mask_build_s": sig(mask_s), **gpu_at(n, d, flex, masks,
                                                                                            flex_flash)}
            out[f"D{d}_N{n}"] = res
            print_table(f"GPU {out['device']}  N={n:,} D={d} l={ell_for(n)} B={GPU_B} H={GPU_H} bf16 (TFLOP/s on "
                        "computed blocks; dense: causal half; vs flex = flex time / ours)",
                        ["D", "N", "method", "pattern", "fwd ms", "fwd+bwd ms", "TFLOP/s fwd", "TFLOP/s fwd+bwd",
                         "vs flex fwd", "vs flex fwd+bwd"], gpu_rows(d, n, res))
            out["targets"] = gpu_targets(out)
            if json_out:
                write_json_atomic(json_out, {**(record or {}), "gpu": out})
        del masks
        torch.cuda.empty_cache()
    print(f"\ntargets (N in {TARGET_NS}): {json.dumps(out['targets'])}")
    return out


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, no dense SDPA above N=32768, no FlexAttention")
    p.add_argument("--ns", default="3072,12288,65536", help="comma-separated sequence lengths")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention comparison")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; 1 if --quick)")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the GPU rows (no layout builds, CPU tables or CPU FlexAttention)")
    p.add_argument("--gpu-ns", default=None,
                   help="sequence lengths of the GPU rows, in the order run (default: --ns)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc at its defaults (default: train.py's settings, training/memory.py)")
    p.add_argument("--json-out", default=None, metavar="PATH",
                   help="also write the JSON record to PATH (the GPU rows rewrite it after every (N, D))")
    args = p.parse_args(argv)
    try:
        args.ns = [int(x) for x in args.ns.split(",") if x.strip()]
        args.gpu_ns = [int(x) for x in args.gpu_ns.split(",") if x.strip()] if args.gpu_ns else args.ns
    except ValueError:
        p.error("--ns and --gpu-ns take comma-separated integers")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kept = False if args.malloc_defaults else keep_freed_memory()
    machine = f"{platform.platform()}; {cpu_name()}; {torch.get_num_threads()} threads"
    print(f"machine: {machine}\ntorch {torch.__version__}; repeats {args.repeats}; quick {args.quick}; malloc: "
          f"{'freed blocks kept (as train.py)' if kept else 'defaults'}")
    contention = CpuContention()
    torch.manual_seed(0)
    record = {"machine": machine, "torch": torch.__version__, "repeats": args.repeats, "quick": args.quick,
              "malloc_kept": kept}
    cpu = None
    if args.gpu_only:
        print("CPU rows: skipped (--gpu-only)")
    else:
        builds = layout_build_times(args.ns)
        cpu = {f"N{n}": cpu_at(n, args.repeats, args.quick) for n in args.ns}
        print_cpu_summary(cpu)
        if 65536 in args.ns:
            cpu["layout_build_ms_65536"] = builds["N65536"]
        cpu["layout_build_ms"] = builds
        cpu["flex"] = None if (args.quick or args.no_flex) else flex_cpu(args.repeats)
        if cpu["flex"] is None:
            print("\nFlexAttention (CPU): skipped (--quick / --no-flex)")
    record["cpu"] = cpu
    gpu = gpu_section(args.gpu_ns, args.json_out, record)
    others = contention.other_cores()
    print(f"\nother processes used {fmt(others, '.2f')} CPU cores on average during the run")
    if others is not None and others > 0.2 and not args.gpu_only:
        print("WARNING: the CPU was shared with other work; CPU timings are slow and noisy")
    record.update(other_processes_cores=sig(others, 2), gpu=gpu)
    if args.json_out:
        write_json_atomic(args.json_out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
