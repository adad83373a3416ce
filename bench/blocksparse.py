"""Benchmark block-sparse weight matmul (kernels.BlockSparseMatMul) against dense matmul and torch's BSR.

Run: ``python -m bench.blocksparse [--quick] [--features 4096,12288] [--tokens 32,256] [--blocks 8,16,32,64]
[--densities 0.5,0.25,0.1,0.05,0.02] [--repeats R] [--threads N] [--clock wall|cpu] [--gpu-only]``.
Prints one table per (features, tokens); the LAST line printed is one line of JSON with every figure.

What is measured (CPU, always; float32; y = x @ W, x [tokens, features], W [features, features]):
  * dense: ``x @ W`` with the full dense W (forward), and its forward + backward (autograd: dX and the
    dense dW), W and x requiring grad;
  * ours: ``BlockSparseMatMul(layout, block)(x, w, backend="cpu")`` for a random layout of the given
    density (seed 0), forward under no_grad, and forward + backward (dX and the listed blocks of dW);
  * torch BSR: W^T as a ``torch.sparse_bsr_tensor`` (the same blocks; built once, outside the timing),
    forward ``torch.mm(W^T_bsr, x^T)`` (faster than ``F.linear`` with a BSR weight on this CPU); torch has no
    CPU autograd for BSR, so forward + backward is written out with torch's own sparse ops:
    dX^T = ``torch.mm(W_bsr, dy^T)`` and dW on the listed entries by ``torch.sparse.sampled_addmm`` (CSR:
    the only sparse op torch offers for it).
  Each row times all six in turn, --repeats rounds after one warm-up call each (which also builds our CPU
  plan, cached on the BlockSparseMatMul), and reports medians: dense is re-measured next to every row, so
  a burst of contention hits both sides. --clock cpu times this process's CPU time instead of wall time
  (with --threads 1, close to the time on an idle core). --repeats defaults to 3. --quick: 4,096 features,
  block 32.
Speed-up = dense time / ours; "vs BSR" = BSR time / ours. Other processes' CPU use during the run is printed
(in cores): on a shared machine, a figure with other cores busy is a figure under contention.

GPU (only when CUDA is available): bfloat16, ``triton.testing.do_bench`` medians of ours (Triton backend)
forward and forward + backward, cuBLAS (``x @ W`` dense, same shapes), and torch's Triton BSR kernel
(``torch.sparse._triton_ops.bsr_dense_mm``, forward only), for the same features, tokens, blocks 32 and 64.
--gpu-only skips the CPU tables (minutes) and fails without CUDA; bench/gpu_check.sh runs it as its optional
``blocksparse`` stage.

Targets (issue 26), CPU, fp32, 4,096 features, 256 tokens, block 32, forward + backward: at density 0.1 at
least 5x faster than dense and 2x faster than torch's BSR path; never slower than dense at density 0.5.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from bench.common import CpuContention, cpu_name, error_text, fmt, print_table, ratio, sig
from kernels import BlockSparseMatMul, cpu_kernels, random_layout

DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.02)
TARGET = dict(features=4096, tokens=256, block=32)  # the CPU targets are set on this shape


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _bsr_pair(mm: BlockSparseMatMul, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T [out, in] and W [in, out] as torch BSR tensors holding the blocks of w."""
    zero = torch.zeros(1, dtype=torch.long, device=w.device)

    def bsr(major: torch.Tensor, minor: torch.Tensor, blocks: torch.Tensor, n_major: int, size: tuple[int, int]):
        order = torch.argsort(major, stable=True)
        crow = torch.cat([zero, torch.cumsum(torch.bincount(major, minlength=n_major), 0).to(w.device)])
        return torch.sparse_bsr_tensor(crow, minor[order].to(w.device), blocks[order.to(w.device)].contiguous(),
                                       size=size)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR tensor support is in beta"
        wt = bsr(mm.cols, mm.rows, w.transpose(1, 2), mm.out_blocks, (mm.out_features, mm.in_features))
        return wt, bsr(mm.rows, mm.cols, w, mm.in_blocks, (mm.in_features, mm.out_features))


def _csr_pattern(mm: BlockSparseMatMul) -> torch.Tensor:
    """The elements of W's listed blocks as a CSR tensor [in, out] (sampled_addmm's mask)."""
    b = mm.block
    return mm.layout.repeat_interleave(b, 0).repeat_interleave(b, 1).float().to_sparse_csr()


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median time of each function over ``repeats`` rounds that call every function once, in turn, after
    one warm-up call each: on a shared machine, each sees the same spread of contention."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _row(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, block: int, density: float, repeats: int,
         clock: Callable[[], float]) -> dict:
    """Dense, ours and torch's BSR path, forward and forward + backward, on one random layout."""
    features = x.shape[1]
    mm = BlockSparseMatMul(random_layout(features // block, features // block, density, seed=0), block)
    w = torch.randn(mm.w_shape, generator=torch.Generator().manual_seed(1)).div_((density * features) ** 0.5)
    w.requires_grad_(True)
    xd = x.detach()

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run

    def step(y_of: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        def run() -> None:
            for t in leaves:
                t.grad = None
            y_of().backward(dy)
        return run

    fns = {"dense_fwd": no_grad(lambda: x @ weight), "dense_fwd_bwd": step(lambda: x @ weight, (x, weight)),
           "ours_fwd": no_grad(lambda: mm(x, w, backend="cpu")),
           "ours_fwd_bwd": step(lambda: mm(x, w, backend="cpu"), (x, w))}
    row = {"density_actual": mm.density, "nnz": mm.nnz}
    try:
        wt_bsr, w_bsr = _bsr_pair(mm, w.detach())
        pattern = _csr_pattern(mm)
        xt, dyt = xd.t(), dy.t()

        def bsr_step() -> None:
            torch.mm(wt_bsr, xt)  # y^T
            torch.mm(w_bsr, dyt)  # dx^T
            torch.sparse.sampled_addmm(pattern, xt, dy, beta=0.0)  # dW on the listed entries

        fns |= {"bsr_fwd": lambda: torch.mm(wt_bsr, xt), "bsr_fwd_bwd": bsr_step}
    except (RuntimeError, NotImplementedError) as e:
        row["bsr_error"] = error_text(e)
    return row | _interleaved(fns, repeats, clock)


def run_cpu(features: list[int], tokens: list[int], blocks: list[int], densities: list[float], repeats: int,
            clock: Callable[[], float]) -> list[dict]:
    results = []
    for f in features:
        for t in tokens:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(t, f, generator=g, requires_grad=True)
            weight = torch.randn(f, f, generator=g).div_(f ** 0.5).requires_grad_(True)
            dy = torch.randn(t, f, generator=g)
            rows = []
            for b in blocks:
                for d in densities:
                    r = {"features": f, "tokens": t, "block": b, "density": d,
                         **_row(x, weight, dy, b, d, repeats, clock)}
                    results.append(r)
                    rows.append([str(b), f"{d:g}", *(fmt(_ms(r.get(k)), ".3g") for k in ("dense_fwd", "ours_fwd")),
                                 fmt(ratio(r["dense_fwd"], r["ours_fwd"]), ".2f") + "x",
                                 *(fmt(_ms(r.get(k)), ".3g") for k in ("dense_fwd_bwd", "ours_fwd_bwd")),
                                 fmt(ratio(r["dense_fwd_bwd"], r["ours_fwd_bwd"]), ".2f") + "x",
                                 *(fmt(_ms(r.get(k)), ".3g") for k in ("bsr_fwd", "bsr_fwd_bwd")),
                                 fmt(ratio(r.get("bsr_fwd_bwd"), r["ours_fwd_bwd"]), ".2f") + "x"])
                    print(f"  measured block {b} density {d:g}", flush=True)
            print_table(f"CPU fp32, {f:,} features, {t} tokens (ms)",
                        ["block", "density", "dense fwd", "ours fwd", "vs dense", "dense f+b", "ours f+b", "vs dense",
                         "BSR fwd", "BSR f+b", "f+b vs BSR"], rows)
    return results


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def targets(results: list[dict]) -> dict:
    """The issue's CPU targets, from the rows measured on their shape (None when that shape was not run)."""
    def row(density: float) -> dict | None:
        return next((r for r in results if r["density"] == density and all(r[k] == v for k, v in TARGET.items())),
                    None)

    out = {}
    r = row(0.1)
    if r is not None:
        vs_dense, vs_bsr = ratio(r["dense_fwd_bwd"], r["ours_fwd_bwd"]), ratio(r.get("bsr_fwd_bwd"), r["ours_fwd_bwd"])
        out["d0.1_vs_dense"], out["d0.1_vs_dense_met"] = sig(vs_dense, 3), vs_dense >= 5
        out["d0.1_vs_bsr"] = sig(vs_bsr, 3)
        out["d0.1_vs_bsr_met"] = None if vs_bsr is None else vs_bsr >= 2
    r = row(0.5)
    if r is not None:
        vs_dense = ratio(r["dense_fwd_bwd"], r["ours_fwd_bwd"])
        out["d0.5_vs_dense"], out["d0.5_not_slower_met"] = sig(vs_dense, 3), vs_dense >= 1
    return out


def run_gpu(features: list[int], tokens: list[int], blocks: list[int], densities: list[float],
            dev: str = "cuda") -> list[dict]:
    """bf16 on CUDA: ours (Triton) vs cuBLAS and torch's Triton BSR kernel."""
    from triton.testing import do_bench

    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except ImportError:
        bsr_dense_mm = None
    dt = torch.bfloat16
    results = []
    for f in features:
        for t in tokens:
            x = torch.randn(t, f, device=dev, dtype=dt, requires_grad=True)
            dy = torch.randn(t, f, device=dev, dtype=dt)
            weight = torch.randn(f, f, device=dev, dtype=dt, requires_grad=True)
            with torch.no_grad():
                dense_fwd = do_bench(lambda x=x, weight=weight: x @ weight)
            dense_fb = do_bench(lambda x=x, weight=weight, dy=dy: (x @ weight).backward(dy), grad_to_none=[x, weight])
            rows = []
            for b in blocks:
                for d in densities:
                    mm = BlockSparseMatMul(random_layout(f // b, f // b, d, seed=0), b)
                    w = torch.randn(mm.w_shape, device=dev, dtype=dt, requires_grad=True)
                    with torch.no_grad():
                        fwd = do_bench(lambda: mm(x, w, backend="triton"))  # noqa: B023
                    fb = do_bench(lambda: mm(x, w, backend="triton").backward(dy), grad_to_none=[x, w])  # noqa: B023
                    bsr = None
                    if bsr_dense_mm is not None:
                        wt_bsr = _bsr_pair(mm, w.detach())[0]
                        xt = x.detach().t().contiguous()
                        bsr = do_bench(lambda: bsr_dense_mm(wt_bsr, xt))  # noqa: B023
                    results.append({"features": f, "tokens": t, "block": b, "density": d, "cublas_fwd_ms": dense_fwd,
                                    "cublas_fwd_bwd_ms": dense_fb, "ours_fwd_ms": fwd, "ours_fwd_bwd_ms": fb,
                                    "torch_triton_bsr_fwd_ms": bsr})
                    rows.append([str(b), f"{d:g}", fmt(fwd, ".3g"), fmt(ratio(dense_fwd, fwd), ".2f") + "x",
                                 fmt(fb, ".3g"), fmt(ratio(dense_fb, fb), ".2f") + "x", fmt(bsr, ".3g")])
            print_table(f"GPU bf16, {f:,} features, {t} tokens: cuBLAS fwd {dense_fwd:.3g} ms, "
                        f"fwd+bwd {dense_fb:.3g} ms",
                        ["block", "density", "ours fwd ms", "vs cuBLAS", "ours fwd+bwd ms", "vs cuBLAS",
                         "torch Triton BSR fwd ms"], rows)
    return results


def _rounded(rows: list[dict]) -> list[dict]:
    return [{k: sig(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="4,096 features, block 32, every density")
    ap.add_argument("--features", type=_ints, default=[4096, 12288])
    ap.add_argument("--tokens", type=_ints, default=[32, 256])
    ap.add_argument("--blocks", type=_ints, default=[8, 16, 32, 64])
    ap.add_argument("--densities", type=_floats, default=list(DENSITIES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU section (needs CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (robust to other processes with --threads 1)")
    args = ap.parse_args()
    if args.quick:
        args.features, args.blocks = [4096], [32]
    if args.gpu_only and not torch.cuda.is_available():
        ap.error("--gpu-only needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"CPU: {cpu_name()}, {threads} threads, torch {torch.__version__}, {args.clock} clock")
    compiled = cpu_kernels.status()
    print(compiled)
    contention = CpuContention()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    cpu = [] if args.gpu_only else run_cpu(args.features, args.tokens, args.blocks, args.densities, args.repeats,
                                           clock)
    busy = None if args.gpu_only else contention.other_cores()
    if not args.gpu_only:
        print(f"\nOther processes kept {fmt(busy, '.2f')} cores busy on average during the CPU runs.")
    goals = targets(cpu)
    if goals:
        print("Targets (4,096 features, 256 tokens, block 32, fwd+bwd): "
              + ", ".join(f"{k} {v}" for k, v in goals.items()))
    gpu = None
    if torch.cuda.is_available():
        gpu = run_gpu(args.features, args.tokens, [b for b in args.blocks if b >= 32] or [32], args.densities)
    else:
        print("GPU: no CUDA device here; the GPU section did not run.")
    print(json.dumps({"cpu": cpu_name(), "machine": platform.machine(), "threads": threads, "torch": torch.__version__,
                      "clock": args.clock, "compiled": compiled, "repeats": args.repeats, "quick": args.quick,
                      "other_cores_busy": sig(busy, 2), "targets": goals, "rows": _rounded(cpu),
                      "gpu": None if gpu is None else _rounded(gpu)}))



if __name__ == "__main__":
    main()
