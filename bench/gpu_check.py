"""The first-GPU check, stage by stage: each stage writes ``OUT/<stage>.json`` (and prints what it found).

Run the whole check with ``bash bench/gpu_check.sh [OUT]`` (it calls these stages with a timeout each, and
pytest and the GPU rows of bench.attention and bench.train between them); one stage alone with
``python3 -m bench.gpu_check STAGE --out OUT``. Stages:

  versions   python, torch, triton, numpy, CUDA, the GPU (name, capability, SMs, shared memory per block),
             and which of the project's other dependencies this image has.
  patterns   forward + backward once per pattern (all, local, strided, fixed, fixed with distinct summaries,
             and a layout built for heads=1 with distinct summaries) against the dense reference: bf16 at
             block 64 / D 64 and block 128 / D 128, fp32 ("ieee" and "tf32x3" against the fp32 tolerance),
             and the int64 offset path forced on; finiteness and the largest error relative to the
             reference's largest value, per output and gradient.
  resources  per (block, D, pass), bf16, D 32 / 64 / 128: the config that launched (and whether it was a fallback),
             registers, spilled bytes, shared memory, warps, stages, and whether the PTX uses wgmma.
             ``--offline ARCH`` (e.g. 90) compiles for that GPU without one (ptxas gives registers and
             spills; the first config within 227 KB of shared memory is the one a launch would keep).
  big        one forward + backward at N = 65,536, H = 16, D = 128 (bf16, local and strided, block 128):
             time, peak memory, finiteness, 16 rows of the output against a per-row reference, and the
             identities sum_j dV_j = sum_i dO_i and sum_j dK_j = 0; then, memory permitting, a B = 32
             forward (B * H * N * D = 2^32 elements) whose last batch element must equal a B = 1 call.
  summary    reads every stage's JSON in OUT and prints one table.
  tune       (optional, not in the default run) each pass alone, timed with the table's config and its
             neighbours, per (block, D) of --blocks / --dims, at N = --tune-n: informs the next CONFIGS edit.

``--dry-run`` checks imports and arguments and skips what needs CUDA with a clear message (runs anywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("versions", "patterns", "resources", "big", "summary", "tune")
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-5}  # as tests/test_attention.py
PATTERNS = {
    "all": ("all", {}, 0),
    "local": ("local", {"window": 200}, 0),
    "strided": ("strided", {"stride": 48}, 0),
    "fixed": ("fixed", {"stride": 128, "summary": 16}, 0),
    "fixed-distinct": ("fixed", {"stride": 128, "summary": 16, "distinct_summaries": True}, 0),
    "fixed-distinct-shared": ("fixed", {"stride": 128, "summary": 16, "distinct_summaries": True}, 1),
}  # name -> (kind, parameters, layout heads: 0 = the input's H, 1 = one layout for every head)
SHARED_MEMORY_LIMIT = 232448  # bytes per block on H100 / H200 (227 KB), for --offline
DEVICE = "cuda"  # where the stages run (a smoke test of this module may point it at the CPU interpreter)
OTHER_MODULES = ("numpy", "PIL", "safetensors", "soxr", "tqdm", "soundfile", "pytest", "xdist")


# --- helpers -------------------------------------------------------------------------------------------------


def write_json(out: Path, name: str, record: dict) -> Path:
    """``out/name.json``, written atomically (a temporary file renamed over it)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def error_text(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| over the largest |want| (the tests' measure)."""
    scale = want.float().abs().max().item()
    return (got.float() - want.float()).abs().max().item() / (scale or 1.0)


def cuda_or_skip(args: argparse.Namespace, stage: str) -> dict | None:
    """None when the stage can run on CUDA here, else the record of a skipped stage (and a clear message)."""
    if args.dry_run or not torch.cuda.is_available():
        why = "dry run" if args.dry_run else "no CUDA device"
        print(f"[{stage}] skipped: {why} (this stage needs a GPU)")
        return {"stage": stage, "status": "skipped", "reason": why}
    return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- versions ------------------------------------------------------------------------------------------------


def stage_versions(args: argparse.Namespace) -> dict:
    import importlib.util

    import numpy
    import triton

    rec = {"stage": "versions", "status": "ok", "python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton.__version__,
           "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(),
           "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
           "modules": {m: importlib.util.find_spec(m) is not None for m in OTHER_MODULES}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
        for attr in ("shared_memory_per_block_optin", "shared_memory_per_multiprocessor", "regs_per_multiprocessor"):
            rec["gpu"][attr] = getattr(p, attr, "missing")
        try:
            rec["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            rec["driver"] = error_text(exc)
    import kernels.triton_attention as ta

    rec["kernels_interpreted"] = ta.INTERPRETED
    for key in ("python", "torch", "torch_cuda", "triton", "numpy", "gpu", "driver", "modules"):
        if key in rec:
            print(f"{key}: {rec[key]}")
    return rec


# --- patterns ------------------------------------------------------------------------------------------------


def _inputs(b, h, n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(4)]


def fwd_bwd(q, k, v, do, layout, backend: str, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    from kernels import attention

    o = attention(q, k, v, layout, backend=backend, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def compare(name: str, layout_args: tuple, dtype: torch.dtype, block: int, d: int, n: int, heads: int,
            batch: int = 2, **kw) -> dict:
    from kernels import make_layout

    kind, params, layout_heads = layout_args
    q, k, v, do = _inputs(batch, heads, n, d, dtype, DEVICE)
    layout = make_layout(kind, n, block, heads=layout_heads or heads, **params)
    start = time.perf_counter()
    got = fwd_bwd(q, k, v, do, layout, "triton", **kw)
    sync()
    seconds = time.perf_counter() - start
    want = fwd_bwd(q, k, v, do, layout, "reference")
    dtype_name = str(dtype).removeprefix("torch.")
    errs = {t: rel_err(a, b) for t, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
    finite = all(bool(torch.isfinite(a).all()) for a in got)
    tol = TOLERANCE[dtype_name]
    ok = finite and max(errs.values()) <= tol
    return {"case": name, "dtype": dtype_name, "block": block, "D": d, "N": n, "H": heads, "B": batch, **kw,
            "finite": finite, "rel_err": {t: float(f"{e:.3g}") for t, e in errs.items()}, "tolerance": tol,
            "ok": ok, "first_call_s": round(seconds, 3)}


def stage_patterns(args: argparse.Namespace) -> dict:
    skipped = cuda_or_skip(args, "patterns")
    if skipped:
        return skipped
    import kernels.triton_attention as ta

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in exact fp32
    torch.backends.cudnn.allow_tf32 = False
    cases = []
    plan = [(name, torch.bfloat16, 64, 64, 2000, {}) for name in PATTERNS]
    plan += [(name, torch.bfloat16, 128, 128, 2048, {}) for name in PATTERNS]
    plan += [(name, torch.float32, 64, 64, 1000, {"fp32_precision": p}) for name in PATTERNS
             for p in ("ieee", "tf32x3")]
    for name, dtype, block, d, n, kw in plan:
        try:
            rec = compare(name, PATTERNS[name], dtype, block, d, n, heads=4, **kw)
        except Exception as exc:
            rec = {"case": name, "dtype": str(dtype), "block": block, "D": d, **kw, "ok": False,
                   "error": error_text(exc)}
        cases.append(rec)
        print(json.dumps(rec))
    # int64 offsets, forced on (they switch on by themselves only past 2^31 elements per (batch, head) slice)
    limit = ta.INT32_LIMIT
    try:
        ta.INT32_LIMIT = 1
        rec = compare("local-int64-offsets", PATTERNS["local"], torch.bfloat16, 64, 64, 2000, heads=4)
    except Exception as exc:
        rec = {"case": "local-int64-offsets", "ok": False, "error": error_text(exc)}
    finally:
        ta.INT32_LIMIT = limit
    cases.append(rec)
    print(json.dumps(rec))
    failed = [c["case"] + " " + str(c.get("dtype")) for c in cases if not c["ok"]]
    print(f"[patterns] {len(cases) - len(failed)}/{len(cases)} within tolerance" + (f"; failed: {failed}" if failed
                                                                                      else ""))
    return {"stage": "patterns", "status": "ok" if not failed else "failed", "failed": failed, "cases": cases}


# --- resources -----------------------------------------------------------------------------------------------


def _kernel_facts(compiled) -> dict:
    """What Triton's compiled kernel says about itself; a missing attribute is reported, not raised."""
    facts = {}
    for name, get in (("registers", lambda c: c.n_regs), ("spills", lambda c: c.n_spills),
                      ("shared", lambda c: c.metadata.shared), ("warps", lambda c: c.metadata.num_warps),
                      ("stages", lambda c: c.metadata.num_stages)):
        try:
            facts[name] = get(compiled)
        except Exception as exc:  # attribute names move between Triton versions
            facts[name] = f"missing ({error_text(exc, 80)})"
    try:
        ptx = compiled.asm["ptx"]
        facts["wgmma"] = "wgmma.mma_async" in ptx
        facts["mma_sync"] = "mma.sync" in ptx
    except Exception as exc:
        facts["wgmma"] = f"missing ({error_text(exc, 80)})"
    return facts


def _ptxas_facts(ptx: str, arch: int) -> dict:
    """Registers and spills from ``ptxas -v`` (Triton's bundled ptxas) on the kernel's PTX."""
    import triton

    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception:
        ptxas = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        run = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, timeout=120)
    log = run.stderr + run.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else f"missing (ptxas rc {run.returncode})",
            "spills": int(spill.group(1)) + int(spill.group(2)) if spill else "missing"}


def compile_offline(kernel, args: list, meta: dict, cfg, arch: int):
    """Compile one launch for GPU ``arch`` without a GPU, through the pieces JITFunction.run uses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    import kernels.triton_attention as ta

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**meta, **ta.launch_options(cfg)}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_grid(args: argparse.Namespace) -> list[tuple[int, int, torch.dtype]]:
    blocks = [int(x) for x in args.blocks.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    dtypes = [getattr(torch, x) for x in args.dtypes.split(",")]
    return [(b, d, t) for t in dtypes for b in blocks for d in dims]


def resources_online(args: argparse.Namespace) -> list[dict]:
    import kernels.triton_attention as ta
    from kernels import attention, make_layout

    rows = []
    for block, d, dtype in resource_grid(args):
        n = 8 * block
        q, k, v, do = _inputs(1, 2, n, d, dtype, DEVICE)
        layout = make_layout(args.kind, n, block, heads=2, **PATTERNS[args.kind][1])
        try:
            qg = q.requires_grad_()
            attention(qg, k, v, layout, backend="triton", fp32_precision=args.fp32_precision).backward(do)
            sync()
            error = None
        except Exception as exc:
            error = error_text(exc)
        dtype_name = str(dtype).removeprefix("torch.")
        for kernel_pass in ta.PASSES:
            row = {"block": block, "D": d, "dtype": dtype_name, "pass": kernel_pass}
            found = [(key, cfg_kernel) for key, cfg_kernel in ta.COMPILED.items()
                     if key[0] == kernel_pass and key[3] == block and key[4] == d and key[5] == dtype_name]
            if not found:
                row["error"] = error or "no compiled kernel recorded"
            else:
                key, (cfg, compiled) = found[-1]
                first = ta.configs(kernel_pass, block, d, dtype)[0]
                row.update(config=cfg.__dict__, fallback=cfg != first, **_kernel_facts(compiled))
            rows.append(row)
    return rows


def resources_offline(args: argparse.Namespace) -> list[dict]:
    import kernels.triton_attention as ta
    from kernels import make_layout

    if ta.INTERPRETED:
        raise RuntimeError("--offline compiles the kernels: unset TRITON_INTERPRET")
    rows = []
    for block, d, dtype in resource_grid(args):
        n = 8 * block
        q, k, v, o, do, dq, dk, dv = (torch.zeros(1, 2, n, d, dtype=dtype) for _ in range(8))
        lse, delta = torch.zeros(2, n), torch.zeros(2, n)
        layout = make_layout(args.kind, n, block, heads=2, **PATTERNS[args.kind][1])
        dtype_name = str(dtype).removeprefix("torch.")
        for kernel_pass in ta.PASSES:
            kernel, kargs, meta = ta.pass_call(kernel_pass, layout, "compiled", 0.125, q, k, v, o, lse, do, delta,
                                               dq, dk, dv, args.fp32_precision)
            tried = []
            row = {"block": block, "D": d, "dtype": dtype_name, "pass": kernel_pass}
            for i, cfg in enumerate(ta.configs(kernel_pass, block, d, dtype)):
                try:
                    compiled = compile_offline(kernel, kargs, meta, cfg, args.offline)
                except Exception as exc:
                    tried.append({"config": cfg.__dict__, "error": error_text(exc)})
                    if not ta._does_not_fit(exc):
                        break
                    continue
                facts = {**_kernel_facts(compiled), **_ptxas_facts(compiled.asm["ptx"], args.offline)}
                if isinstance(facts["shared"], int) and facts["shared"] > SHARED_MEMORY_LIMIT:
                    tried.append({"config": cfg.__dict__, "shared": facts["shared"]})
                    continue
                row.update(config=cfg.__dict__, fallback=i > 0, **facts)
                break
            if tried:
                row["did_not_fit"] = tried
            if "config" not in row:
                row["error"] = "no config fits"
            rows.append(row)
            print(json.dumps(row))
    return rows


def stage_resources(args: argparse.Namespace) -> dict:
    if args.offline:
        if args.dry_run:
            print(f"[resources] dry run: would compile offline for sm_{args.offline}")
            return {"stage": "resources", "status": "skipped", "reason": "dry run"}
        rows = resources_offline(args)
        where = f"offline, sm_{args.offline}"
    else:
        skipped = cuda_or_skip(args, "resources")
        if skipped:
            return skipped
        rows = resources_online(args)
        where = torch.cuda.get_device_name()
    print_resources(rows, where)
    bad = [r for r in rows if "error" in r]
    return {"stage": "resources", "status": "ok" if not bad else "failed", "where": where, "rows": rows}


def print_resources(rows: list[dict], where: str) -> None:
    print(f"\nKernel resources ({where}): config = own x step rows, warps, stages")
    print(f"{'block':>5} {'D':>4} {'dtype':>8} {'pass':>4} {'config':>16} {'fallback':>8} {'regs':>5} {'spills':>6} "
          f"{'shared':>7} {'wgmma':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['block']:>5} {r['D']:>4} {r['dtype']:>8} {r['pass']:>4}  error: {r['error'][:90]}")
            continue
        c = r["config"]
        cfg = f"{c['own']}x{c['step']} w{c['warps']} s{c['stages']}"
        print(f"{r['block']:>5} {r['D']:>4} {r['dtype']:>8} {r['pass']:>4} {cfg:>16} {r['fallback']!s:>8} "
              f"{r.get('registers')!s:>5} {r.get('spills')!s:>6} {r.get('shared')!s:>7} {r.get('wgmma')!s:>5}")


# --- tune (optional) -------------------------------------------------------------------------------------------


def neighbours(cfg, block: int) -> list:
    """``cfg`` and the configs one change away: own or step halved or doubled, the other warp count, one stage
    fewer or more (tiles from 16 up to the block)."""
    from dataclasses import replace

    out = [cfg]
    out += [replace(cfg, own=x) for x in (cfg.own // 2, cfg.own * 2) if 16 <= x <= block]
    out += [replace(cfg, step=x) for x in (cfg.step // 2, cfg.step * 2) if 16 <= x <= block]
    out.append(replace(cfg, warps=8 if cfg.warps == 4 else 4))
    out += [replace(cfg, stages=x) for x in (cfg.stages - 1, cfg.stages + 1) if 1 <= x <= 4]
    return list(dict.fromkeys(out))


def time_ms(fn) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench on CUDA, wall time of 3 calls elsewhere."""
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[1]


def tune_rows(args: argparse.Namespace) -> list[dict]:
    import kernels.triton_attention as ta
    from kernels import make_layout

    mode = ta.launch_mode(DEVICE)
    rows, n, heads, dtype = [], args.tune_n, args.tune_heads, getattr(torch, args.dtypes.split(",")[0])
    for block, d, _ in resource_grid(args):
        layout = make_layout(args.kind, n, block, heads=heads, **PATTERNS[args.kind][1])
        q, k, v, do = _inputs(1, heads, n, d, dtype, DEVICE)
        o, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
        lse = torch.empty(heads, n, device=q.device, dtype=torch.float32)
        scale = d**-0.5
        ta._launch("fwd", *ta.pass_call("fwd", layout, mode, scale, q, k, v, o, lse), layout, q, mode)
        delta = (o.float() * do.float()).sum(-1).reshape(heads, n)
        outputs = {"fwd": (o, lse), "dkv": (dk, dv), "dq": (dq,)}
        for kernel_pass in ta.PASSES:
            kernel, kargs, meta = ta.pass_call(kernel_pass, layout, mode, scale, q, k, v, o, lse, do, delta,
                                               dq, dk, dv)
            table = ta.configs(kernel_pass, block, d, dtype)[0]
            want = None
            for cfg in neighbours(table, block):
                row = {"block": block, "D": d, "pass": kernel_pass, "config": cfg.__dict__, "table": cfg == table}
                grid = (layout.num_blocks * (block // cfg.own), heads, 1)

                def run(kernel=kernel, grid=grid, kargs=kargs, meta=meta, cfg=cfg):
                    return kernel[grid](*kargs, **meta, **ta.launch_options(cfg))

                try:
                    compiled = run()
                    sync()
                    got = [t.float().clone() for t in outputs[kernel_pass]]
                    if want is None:
                        want = got
                    row["max_rel_diff_vs_table"] = max(rel_err(a, b) for a, b in zip(got, want, strict=True))
                    row["ms"] = round(time_ms(run), 4)
                    if mode == "compiled":
                        row.update(_kernel_facts(compiled))
                except Exception as exc:
                    row["error"] = error_text(exc)
                rows.append(row)
                print(json.dumps(row))
        del q, k, v, do, o, dq, dk, dv, lse, delta
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def stage_tune(args: argparse.Namespace) -> dict:
    """Each pass alone, timed with the table's config and its neighbours (``neighbours``) at N = --tune-n and
    H = --tune-heads, bf16, per (block, D): milliseconds, the result's largest difference from the table config's,
    and the kernel's registers, spills and shared memory. Not in the default run: it informs the next CONFIGS edit."""
    skipped = cuda_or_skip(args, "tune")
    if skipped:
        return skipped
    rows = tune_rows(args)
    best = {}
    for r in rows:
        if "ms" in r:
            key = f"b{r['block']}_D{r['D']}_{r['pass']}"
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = {"ms": r["ms"], "config": r["config"], "table": r["table"]}
    for key, b in best.items():
        print(f"[tune] {key}: fastest {b['config']} in {b['ms']} ms{' (the table)' if b['table'] else ''}")
    bad = [r for r in rows if "error" in r or r.get("max_rel_diff_vs_table", 0) > 1e-2]
    return {"stage": "tune", "status": "ok" if not bad else "failed", "N": args.tune_n, "H": args.tune_heads,
            "kind": args.kind,
            "dtype": args.dtypes.split(",")[0], "rows": rows, "fastest": best, "bad": bad}


# --- big -----------------------------------------------------------------------------------------------------


def row_reference(q, k, v, do, layout, rows: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and dQ of query positions ``rows`` ([B, H, len(rows), D] fp32 each), from the pattern's
    predicate over every key: P = softmax(q k^T), dS = P (dO v^T - rowsum(P dO v^T)), dQ = scale dS k."""
    j = torch.arange(q.shape[2], device=q.device)
    heads = torch.arange(q.shape[1], device=q.device)[:, None, None] if layout.table_heads > 1 else 0
    mask = layout.allowed(rows[None, :, None], j[None, None, :], heads)  # [H or 1, rows, N]
    kf, vf = k.float(), v.float()
    s = torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows].float(), kf) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    dp = torch.einsum("bhrd,bhnd->bhrn", do[:, :, rows].float(), vf)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return torch.einsum("bhrn,bhnd->bhrd", p, vf), torch.einsum("bhrn,bhnd->bhrd", ds, kf) * scale


def big_case(kind: str, n: int, heads: int, d: int, block: int, stride: int) -> dict:
    """One forward + backward at a large size (timed on the second call), checked where a check is affordable:
    16 rows of the output and of dQ against ``row_reference``, sum_j dV_j = sum_i dO_i (rows of P sum to 1),
    and, reported only (bf16 rounding makes it inexact), sum_j dK_j over the largest |dK| (rows of dS sum to 0)."""
    from kernels import attention, make_layout

    params = {"window": stride} if kind == "local" else {"stride": stride}
    layout = make_layout(kind, n, block, heads=heads, **params)
    q, k, v, do = _inputs(1, heads, n, d, torch.bfloat16, DEVICE, seed=1)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):  # the first call compiles
        for t in (qg, kg, vg):
            t.grad = None
        sync()
        start = time.perf_counter()
        out = attention(qg, kg, vg, layout, backend="triton")
        out.backward(do)
        sync()
        times.append(time.perf_counter() - start)
    picked = [0, 1, block - 1, block, n // 2, n - stride - 1, n - 2, n - 1]
    picked += torch.randint(0, n, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = torch.tensor(picked, device=q.device)
    want_out, want_dq = row_reference(q, k, v, do, layout, rows, d**-0.5)
    grads = {"dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
    dv_sum, do_sum = vg.grad.float().sum(2), do.float().sum(2)
    dk_sum = kg.grad.float().sum(2)
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    return {"kind": kind, "N": n, "H": heads, "D": d, "block": block, "stride": stride,
            "first_call_s": round(times[0], 3), "fwd_bwd_s": round(times[1], 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
            "finite": finite, "rows_out_rel_err": float(f"{rel_err(out[:, :, rows], want_out):.3g}"),
            "rows_dq_rel_err": float(f"{rel_err(qg.grad[:, :, rows], want_dq):.3g}"),
            "dv_sum_rel_err": float(f"{rel_err(dv_sum, do_sum):.3g}"),
            "dk_sum_over_dk_max": float(f"{dk_sum.abs().max().item() / kg.grad.float().abs().max().item():.3g}")}


def batch_offsets_case(n: int, heads: int, d: int, batch: int, block: int, stride: int) -> dict:
    """B * H * N * D >= 2^31 elements: the last batch element must equal the same call with B = 1."""
    from kernels import attention, make_layout

    need = 4 * batch * heads * n * d * 2 + (2 << 30)
    free = torch.cuda.mem_get_info()[0]
    rec = {"B": batch, "H": heads, "N": n, "D": d, "elements": batch * heads * n * d,
           "needs_gib": round(need / 2**30, 1)}
    if free < need:
        return {**rec, "skipped": f"needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"}
    layout = make_layout("local", n, block, heads=heads, window=stride)
    q, k, v = (torch.randn(batch, heads, n, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = attention(q, k, v, layout, backend="triton")
        sync()
        seconds = time.perf_counter() - start
        last = attention(q[-1:], k[-1:], v[-1:], layout, backend="triton")
        diff = (out[-1:].float() - last.float()).abs().max().item()
    del q, k, v, out
    torch.cuda.empty_cache()
    return {**rec, "fwd_s": round(seconds, 3), "last_vs_b1_max_abs_diff": diff, "ok": diff == 0.0}


def stage_big(args: argparse.Namespace) -> dict:
    skipped = cuda_or_skip(args, "big")
    if skipped:
        return skipped
    cases, failed = [], []
    for kind in ("local", "strided"):
        try:
            rec = big_case(kind, 65536, 16, 128, 128, 256)
            tol = TOLERANCE["bfloat16"]
            ok = rec["finite"] and max(rec["rows_out_rel_err"], rec["rows_dq_rel_err"], rec["dv_sum_rel_err"]) <= tol
        except Exception as exc:
            rec, ok = {"kind": kind, "error": error_text(exc)}, False
        rec["ok"] = ok
        cases.append(rec)
        failed += [] if ok else [kind]
        print(json.dumps(rec))
        torch.cuda.empty_cache()
    try:
        offsets = batch_offsets_case(65536, 16, 128, 32, 128, 256)
    except Exception as exc:
        offsets = {"error": error_text(exc), "ok": False}
    print(json.dumps(offsets))
    if offsets.get("ok") is False:
        failed.append("batch offsets")
    return {"stage": "big", "status": "ok" if not failed else "failed", "failed": failed, "cases": cases,
            "int64_batch_offsets": offsets}


# --- summary -------------------------------------------------------------------------------------------------


SUMMARY_ORDER = ("versions", "patterns", "resources", "pytest", "attention", "train", "big", "tune")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pytest_counts(path: Path) -> str | None:
    """'passed/total (failures, errors, skipped)' from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"{n - f - e - s}/{n} passed, {f} failed, {e} errors, {s} skipped"


def stage_summary(args: argparse.Namespace) -> dict:
    """One line per stage: how its run ended and the figures that matter."""
    out = Path(args.out)
    lines, stages = [], {}
    for name in SUMMARY_ORDER:
        run, result = _read(out / f"run_{name}.json"), _read(out / f"{name}.json")
        if run is None and result is None:
            continue
        info = {"run": run.get("status") if run else None, "seconds": run.get("seconds") if run else None}
        if isinstance(result, dict) and "status" in result:
            info["result"] = result["status"]
        note = ""
        if name == "versions" and result:
            note = f"torch {result.get('torch')}, triton {result.get('triton')}, {result.get('gpu', {}).get('name')}"
            missing = [m for m, ok in result.get("modules", {}).items() if not ok]
            note += f"; missing modules: {missing}" if missing else ""
        elif name == "patterns" and result and "cases" in result:
            worst = max(((max(c["rel_err"].values()), c["case"], c["dtype"]) for c in result["cases"]
                         if "rel_err" in c), default=None)
            note = f"failed: {result['failed']}" + (f"; largest error {worst[0]:.2g} ({worst[1]}, {worst[2]})"
                                                    if worst else "")
        elif name == "resources" and result and "rows" in result:
            rows = result["rows"]
            spills = [f"b{r['block']} D{r['D']} {r['pass']}" for r in rows if isinstance(r.get("spills"), int)
                      and r["spills"] > 0]
            fallbacks = [f"b{r['block']} D{r['D']} {r['pass']}" for r in rows if r.get("fallback")]
            note = f"{len(rows)} kernels; spills: {spills or 'none'}; fallbacks: {fallbacks or 'none'}"
        elif name == "pytest":
            note = _pytest_counts(out / "pytest.xml") or ""
        elif name == "attention" and result and isinstance(result.get("gpu"), dict):
            targets = result["gpu"].get("targets", {})
            met = sum(1 for t in targets.values() if t.get("vs_flex_1.5x"))
            note = f"targets met {met}/{len(targets)} (>= 1.5x Flex, fwd and fwd+bwd, N 16,384 and 65,536)"
        elif name == "train" and result:
            note = "; ".join(f"{r['config']} {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}"
                             for r in result.get("gpu_rows", []))
        elif name == "big" and result and "cases" in result:
            note = "; ".join(f"{c['kind']} {c.get('fwd_bwd_s', 'error')} s" for c in result["cases"])
            note += f"; B=32 offsets ok: {result.get('int64_batch_offsets', {}).get('ok')}"
        info["note"] = note
        stages[name] = info
        lines.append(f"  {name:<10} run {info['run']!s:<8} result {info.get('result', '-')!s:<8} "
                     f"{info['seconds']!s:>6} s  {note}")
    print(f"\nGPU check summary ({out}):")
    print("\n".join(lines) if lines else "  (no stage results)")
    return {"stage": "summary", "status": "ok", "stages": stages}


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the JSON results")
    p.add_argument("--dry-run", action="store_true", help="check imports and arguments; skip what needs CUDA")
    p.add_argument("--offline", type=int, metavar="ARCH", default=None,
                   help="resources: compile for sm_ARCH (e.g. 90) without a GPU")
    p.add_argument("--blocks", default="16,32,64,128", help="resources: layout blocks")
    p.add_argument("--dims", default="32,64,128", help="resources: head dims")
    p.add_argument("--dtypes", default="bfloat16", help="resources: input dtypes (torch names)")
    p.add_argument("--kind", default="local", choices=("all", "local", "strided", "fixed"),
                   help="resources: the pattern compiled")
    p.add_argument("--fp32-precision", default="ieee", choices=("ieee", "tf32x3"),
                   help="resources: how fp32 inputs are multiplied")
    p.add_argument("--tune-n", type=int, default=16384, help="tune: sequence length")
    p.add_argument("--tune-heads", type=int, default=16, help="tune: heads")
    args = p.parse_args(argv)
    for name in ("blocks", "dims"):
        try:
            [int(x) for x in getattr(args, name).split(",")]
        except ValueError:
            p.error(f"--{name} takes comma-separated integers, got {getattr(args, name)!r}")
    for x in args.dtypes.split(","):
        if not isinstance(getattr(torch, x, None), torch.dtype):
            p.error(f"--dtypes: {x!r} is not a torch dtype")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "resources" and args.offline is None and not torch.cuda.is_available() and not args.dry_run:
        print("[resources] no CUDA device: pass --offline 90 to compile for an H100/H200 without one")
    start = time.perf_counter()
    fn = globals()[f"stage_{args.stage}"]
    try:
        rec = fn(args)
    except Exception as exc:
        rec = {"stage": args.stage, "status": "failed", "error": error_text(exc, 2000)}
        print(f"[{args.stage}] failed: {error_text(exc, 2000)}")
    rec["seconds"] = round(time.perf_counter() - start, 1)
    path = write_json(Path(args.out), args.stage, rec)
    print(f"[{args.stage}] {rec['status']} in {rec['seconds']} s -> {path}")
    return 0 if rec["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
