"""attention(): the CPU path and the Triton kernels (interpreted on the CPU) match the dense reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import attention, make_layout

PATTERNS = [
    ("all", {}),
    ("local", {"window": 20}),
    ("strided", {"stride": 7}),
    ("fixed", {"stride": 24, "summary": 8}),
    ("fixed", {"stride": 24, "summary": 4, "distinct_summaries": True}),
]
PATTERN_IDS = ["all", "local", "strided", "fixed", "fixed-distinct"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# The Triton kernels run compiled on CUDA tensors when there is a GPU, else in Triton's interpreter on CPU
# tensors (conftest sets TRITON_INTERPRET=1 there); the CPU path and the reference take CPU tensors.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(backend: str) -> torch.device:
    """The device a test's tensors live on for ``backend``."""
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def inputs(n, dtype, heads=2, d=32, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(batch, heads, n, d, generator=g).to(dtype) for _ in range(4))
    return q, k, v, do


def outputs_and_grads(q, k, v, do, layout, backend):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    o = attention(q, k, v, layout, backend=backend)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def assert_close(got, want, dtype):
    """Max error relative to the largest reference value, per tensor (out, dq, dk, dv)."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == b.dtype == dtype
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind,kw", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [64, 77, 150])
def test_cpu_matches_reference(kind, kw, block, dtype, n):
    q, k, v, do = inputs(n, dtype, heads=3)
    layout = make_layout(kind, n, block, heads=3, **kw)
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, "cpu"), want, dtype)


@pytest.mark.parametrize("kind,kw", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [64, 77])
def test_triton_matches_reference(kind, kw, block, dtype, n):
    """Under TRITON_INTERPRET=1 (set by conftest without a GPU) the same kernels run on the CPU."""
    q, k, v, do = on(TRITON_DEVICE, *inputs(n, dtype, batch=1))
    layout = make_layout(kind, n, block, heads=2, **kw)
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, "triton"), want, dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp16_and_wide_heads(backend):
    q, k, v, do = on(device_for(backend), *inputs(40, torch.float16, heads=1, d=128, batch=1))
    layout = make_layout("local", 40, 16, window=10)
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, backend), want, torch.float16)


def test_shared_layout_broadcasts_over_heads_and_custom_scale():
    q, k, v, do = inputs(50, torch.float32, heads=4)
    layout = make_layout("strided", 50, 16, stride=5)  # heads=1: every head uses it
    want = attention(q, k, v, layout, scale=0.3, backend="reference")
    for backend in ("cpu", "triton"):
        got = attention(*on(device_for(backend), q, k, v), layout, scale=0.3, backend=backend)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_shared_fixed_layout_with_distinct_summaries_uses_head_0s_summary_for_every_head(backend):
    """A layout built with heads=1 is one pattern for all heads: head 0's lists and head 0's summary columns
    (the reference and the CPU path read it so; the Triton kernel once mixed head 0's lists with head h's
    summary columns)."""
    q, k, v, do = on(device_for(backend), *inputs(77, torch.float32, heads=3, batch=1))
    layout = make_layout("fixed", 77, 16, stride=24, summary=4, distinct_summaries=True)  # heads=1
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, backend), want, torch.float32)

# local/all: band schedule; strided: in-place columns (N = 96) or band (N = 90); fixed: gather schedule.
LAYOUT_KW = {"all": {}, "local": {"window": 9}, "strided": {"stride": 8}, "fixed": {"stride": 32, "summary": 4}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [90, 96], ids=["padded", "whole-blocks"])
@pytest.mark.parametrize("kind", sorted(LAYOUT_KW))
def test_strided_input_views_give_the_same_values_and_grads(kind, n, dtype):
    """Non-contiguous q/k/v (split heads of a fused projection, as in the model) give the same values and grads."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, n, 3, 2, 32, generator=g).to(dtype)  # [B, N, 3, H, D]
    dout = torch.randn(1, 2, n, 32, generator=g).to(dtype)
    layout = make_layout(kind, n, 16, heads=2, **LAYOUT_KW[kind])

    def run(backend):
        device = device_for(backend)
        leaf = qkv.detach().to(device).requires_grad_()
        q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views
        out = attention(q, k, v, layout, backend=backend)
        (grad,) = torch.autograd.grad(out, leaf, dout.to(device))
        return out.cpu(), grad.cpu()

    want = run("reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in ("cpu", "triton"):
        for got, ref in zip(run(backend), want, strict=True):
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_auto_backend_on_cpu_is_the_cpu_path():
    q, k, v, _ = inputs(33, torch.float32)
    layout = make_layout("local", 33, 16, window=4)
    torch.testing.assert_close(attention(q, k, v, layout), attention(q, k, v, layout, backend="cpu"))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind,kw", [("local", {"window": 64}), ("strided", {"stride": 64})])
def test_cpu_path_never_builds_an_n_by_n_tensor(kind, kw):
    n = 4096
    q, k, v, do = inputs(n, torch.float32, heads=1, batch=1)
    q.requires_grad_(True)
    layout = make_layout(kind, n, 32, **kw)
    with LargestTensor() as mode:
        attention(q, k, v, layout, backend="cpu").backward(do)
    assert mode.largest < n * n // 16, f"largest tensor has {mode.largest} elements"


def test_bad_inputs_name_the_problem(monkeypatch):
    q, k, v, _ = inputs(32, torch.float32)
    layout = make_layout("local", 32, 16, window=4)
    cases = [
        (dict(q=q[0]), "q must be of shape \\[B, H, N, D\\]"),
        (dict(k=k[:, :, :16]), "same shape"),
        (dict(v=v.double()), "dtype torch.float64"),
        (dict(k=k.bfloat16()), "same dtype"),
        (dict(v=v.to("meta")), "same device"),
        (dict(q=q[..., :16], k=k[..., :16], v=v[..., :16]), "head dim D must be one of"),
        (dict(layout=make_layout("local", 48, 16, window=4)), "built for seq_len=48"),
        (dict(layout=make_layout("local", 32, 16, heads=3, window=4)), "built for heads=3"),
        (dict(layout="local"), "layout must be a kernels.Layout"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(scale=-1.0), "scale must be a positive"),
        (dict(fp32_precision="tf32"), "fp32_precision must be one of"),
        (dict(q=[[1.0]]), "q must be a torch.Tensor"),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, layout=layout) | change
        with pytest.raises(ValueError, match=message):
            attention(**args)
    import kernels.triton_attention as ta

    monkeypatch.setattr(ta, "INTERPRETED", False)  # kernels made for the GPU: CPU tensors cannot run them
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        attention(q, k, v, layout, backend="triton")


def test_triton_launch_mode_follows_the_device_and_how_the_kernels_were_made():
    """CUDA tensors run the compiled kernels, CPU tensors the interpreted ones; any other pairing is refused."""
    from kernels.triton_attention import launch_mode

    assert launch_mode(torch.device("cuda", 0), interpreted=False) == "compiled"
    assert launch_mode("cpu", interpreted=True) == "interpreted"
    for device, interpreted, message in [("cuda", True, "imported with TRITON_INTERPRET=1"),
                                         ("cpu", False, "needs CUDA tensors, or CPU tensors"),
                                         ("meta", True, "got meta"), ("meta", False, "got meta")]:
        with pytest.raises(ValueError, match=message):
            launch_mode(device, interpreted=interpreted)


def test_triton_kernels_are_interpreted_only_when_triton_interpret_is_set_at_import():
    """The decision is made once, when kernels.triton_attention is imported (as @triton.jit makes it): this
    process imported it one way (interpreted without CUDA, compiled with), a fresh one with the other setting
    makes the other kind."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import kernels.triton_attention as ta

    assert ta.INTERPRETED == (not torch.cuda.is_available())  # conftest sets TRITON_INTERPRET=1 without CUDA
    code = ("import kernels.triton_attention as ta, torch; print(ta.INTERPRETED); "
            "print(ta.launch_mode('cpu') if ta.INTERPRETED else ta.launch_mode('cuda'))")
    value, want = ("0", "False\ncompiled") if ta.INTERPRETED else ("1", "True\ninterpreted")
    env = {**os.environ, "TRITON_INTERPRET": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == want


def test_cpu_gather_schedule_rebuilds_masks_when_they_do_not_fit(monkeypatch):
    """Large fixed layouts keep no mask cache: masks are rebuilt per chunk, same result."""
    import kernels.cpu_attention as cpu

    monkeypatch.setattr(cpu, "MASK_CACHE_BYTES", 0)
    q, k, v, do = inputs(100, torch.float32, heads=4)
    layout = make_layout("fixed", 100, 16, heads=4, stride=24, summary=4, distinct_summaries=True)
    assert cpu._plan(layout).masks is None
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, "cpu"), want, torch.float32)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_strided_read_in_place_matches_reference(block, dtype):
    """N = R * l with R a multiple of the block: the CPU path reads the [R, l] view in place."""
    from kernels.cpu_attention import _reads_columns_in_place

    n, stride = 128, 4  # R = 32 rows
    layout = make_layout("strided", n, block, heads=3, stride=stride)
    assert _reads_columns_in_place(layout)
    q, k, v, do = inputs(n, dtype, heads=3)
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, "cpu"), want, dtype)


# --- the Triton backend's launch: configs, fallbacks, grid limits, int64 offsets, fp32 precision -------------


def test_triton_config_table_gives_tiles_that_divide_the_block():
    """Every (pass, block, D, dtype) has a chain of configs: the table's first, then fallbacks down to 16 x 16;
    the compute tiles are powers of two from 16 up that divide the layout block."""
    from kernels.layout import BLOCK_SIZES
    from kernels.triton_attention import CONFIGS, PASSES, configs

    assert set(CONFIGS) == {(p, b) for p in PASSES for b in BLOCK_SIZES}
    for (kernel_pass, block), row in CONFIGS.items():
        for d in (32, 64, 128):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                chain = configs(kernel_pass, block, d, dtype)
                assert chain[0] == row[(2 if dtype == torch.float32 else 0) + (d > 64)]
                assert len(set(chain)) == len(chain) and chain[-1].own == chain[-1].step == 16
                assert chain[-1].stages == 1
                for cfg in chain:
                    for tile in (cfg.own, cfg.step):
                        assert 16 <= tile <= block and block % tile == 0 and tile & (tile - 1) == 0
                    assert cfg.warps in (1, 2, 4, 8) and cfg.stages >= 1


SUB_TILES = {"own-32-step-16": (32, 16), "own-16-step-32": (16, 32)}


@pytest.mark.parametrize("tiles", list(SUB_TILES.values()), ids=list(SUB_TILES))
@pytest.mark.parametrize("kind,kw", PATTERNS, ids=PATTERN_IDS)
def test_triton_compute_tiles_smaller_than_the_block_match_reference(kind, kw, tiles, monkeypatch):
    """Programs that own part of a layout block and walk the listed blocks in smaller steps give the same
    values and gradients (every pass, block 64, N not a multiple of the block)."""
    import kernels.triton_attention as ta

    own, step = tiles
    cfg = ta.Config(own, step, 4, 2)
    monkeypatch.setattr(ta, "CONFIGS", {**ta.CONFIGS, **{(p, 64): (cfg,) * 4 for p in ta.PASSES}})
    monkeypatch.setattr(ta, "_CHOSEN", {})
    q, k, v, do = on(TRITON_DEVICE, *inputs(100, torch.float32, heads=2, batch=1))
    layout = make_layout(kind, 100, 64, heads=2, **kw)
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, "triton"), want, torch.float32)
    assert {c for key, c in ta._CHOSEN.items()} == {cfg}


class DoesNotFit:
    """Stands in for a Triton kernel: launches with fewer than ``stages`` stages, refuses the others as a GPU
    without enough shared memory would (Triton raises OutOfResources before anything runs)."""

    def __init__(self, kernel, stages):
        self.kernel, self.stages, self.tried = kernel, stages, []

    def __getitem__(self, grid):
        def launch(*args, num_stages, **kw):
            self.tried.append(num_stages)
            if num_stages >= self.stages:
                import triton

                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
            return self.kernel[grid](*args, num_stages=num_stages, **kw)

        return launch


def test_triton_falls_back_to_a_config_that_fits_and_remembers_it(monkeypatch):
    import kernels.triton_attention as ta

    fake = DoesNotFit(ta._fwd_kernel, stages=2)
    monkeypatch.setattr(ta, "_fwd_kernel", fake)
    monkeypatch.setattr(ta, "_CHOSEN", {})
    q, k, v, _ = on(TRITON_DEVICE, *inputs(40, torch.float32, heads=2, batch=1))
    layout = make_layout("local", 40, 16, heads=2, window=9)
    want = attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(attention(q, k, v, layout, backend="triton"), want, rtol=1e-5, atol=1e-5)
    first = ta.configs("fwd", 16, 32, torch.float32)[0]
    assert fake.tried == list(range(first.stages, 0, -1))  # the table's stages, then fewer, down to 1
    (chosen,) = [c for key, c in ta._CHOSEN.items() if key[0] == "fwd"]
    assert chosen.stages == 1
    fake.tried.clear()
    attention(q, k, v, layout, backend="triton")
    assert fake.tried == [1]  # the config that fitted is launched directly next time


def test_triton_reports_when_no_config_fits_and_passes_other_errors_through(monkeypatch):
    import kernels.triton_attention as ta

    monkeypatch.setattr(ta, "_fwd_kernel", DoesNotFit(ta._fwd_kernel, stages=0))
    monkeypatch.setattr(ta, "_CHOSEN", {})
    q, k, v, _ = on(TRITON_DEVICE, *inputs(40, torch.float32, heads=2, batch=1))
    layout = make_layout("local", 40, 16, heads=2, window=9)
    with pytest.raises(RuntimeError, match="no config of the fwd kernel fits"):
        attention(q, k, v, layout, backend="triton")

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise TypeError("a bug, not a size")

            return launch

    monkeypatch.setattr(ta, "_fwd_kernel", Broken())
    with pytest.raises(TypeError, match="a bug"):
        attention(q, k, v, layout, backend="triton")


def test_triton_grid_limits_raise_a_clear_error():
    """The grid is (tiles, H, B): CUDA allows 65,535 on its second and third axes."""
    layout = make_layout("local", 16, 16, window=4)
    small = torch.zeros(1, 1, 16, 32, device=TRITON_DEVICE)
    for shape, name in (((65536, 1, 16, 32), "batch B"), ((1, 65536, 16, 32), "heads H")):
        x = small.expand(*shape)  # no memory: the check comes before anything is copied
        with pytest.raises(ValueError, match=f"{name} must be <= 65,535"):
            attention(x, x, x, layout, backend="triton")


@pytest.mark.parametrize("kind,kw", [("local", {"window": 20}), ("strided", {"stride": 7})])
def test_triton_int64_offsets_match_reference(kind, kw, monkeypatch):
    """Offsets switch to int64 past 2^31 elements per (batch, head) slice; forced on here, same results."""
    import kernels.triton_attention as ta

    monkeypatch.setattr(ta, "INT32_LIMIT", 1)
    q, k, v, do = on(TRITON_DEVICE, *inputs(77, torch.float32, batch=2))
    layout = make_layout(kind, 77, 32, heads=2, **kw)
    assert ta.pass_call("fwd", layout, "compiled", 1.0, q, k, v, q, q)[2]["OFF64"]
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    assert_close(outputs_and_grads(q, k, v, do, layout, "triton"), want, torch.float32)


def test_triton_fp32_tf32x3_option_within_the_fp32_tolerance():
    """fp32_precision="tf32x3" (tensor cores on the GPU; the interpreter computes it in fp32)."""
    q, k, v, do = on(TRITON_DEVICE, *inputs(77, torch.float32, batch=1))
    layout = make_layout("fixed", 77, 32, heads=2, stride=24, summary=4, distinct_summaries=True)
    want = outputs_and_grads(q, k, v, do, layout, "reference")
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    o = attention(q, k, v, layout, backend="triton", fp32_precision="tf32x3")
    assert_close((o, *torch.autograd.grad(o, (q, k, v), do)), want, torch.float32)


@pytest.mark.parametrize("kind,kw", [("local", {"window": 20}), ("strided", {"stride": 7})])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("n", [77, 150])
def test_cpu_band_schedule_in_pytorch_matches_reference(kind, kw, block, n, monkeypatch):
    """Without the compiled kernels (no compiler, STS_COMPILED_KERNELS=0) the band layouts run in PyTorch."""
    from kernels import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    q, k, v, do = inputs(n, torch.float32, heads=3)
    layout = make_layout(kind, n, block, heads=3, **kw)
    assert_close(outputs_and_grads(q, k, v, do, layout, "cpu"), outputs_and_grads(q, k, v, do, layout, "reference"),
                 torch.float32)


@pytest.mark.parametrize("kind,kw,n", [("local", {"window": 70}, 200), ("local", {"window": 70}, 192),
                                        ("strided", {"stride": 6}, 192), ("strided", {"stride": 7}, 200),
                                        ("strided", {"stride": 40}, 1280)],
                         ids=["local-padded", "local-whole", "strided-in-place", "strided-padded", "strided-groups"])
@pytest.mark.parametrize("heads,d", [(1, 64), (3, 32)])
def test_cpu_band_runs_compiled_with_the_same_bits_on_any_thread_count(kind, kw, n, heads, d, monkeypatch):
    """Band layouts run in compiled C where it builds (in place when whole, strided grids included); 1, 2 and
    3 threads give the same bits."""
    from kernels import cpu_attention, cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip(cpu_kernels.status())
    calls = []
    band = cpu_attention.CompiledBand
    for name in ("forward", "backward"):
        fn = getattr(band, name)
        monkeypatch.setattr(band, name, staticmethod(lambda *a, fn=fn, name=name: calls.append(name) or fn(*a)))
    q, k, v, do = inputs(n, torch.float32, heads=heads, d=d, batch=2)
    layout = make_layout(kind, n, 32, heads=heads, **kw)
    # 1,280: 40 columns, packed 14 (D 64) or 16 (D 32) at a time, so the last group is a shorter one
    assert cpu_attention._in_place(layout) == (n in (192, 1280))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(outputs_and_grads(q, k, v, do, layout, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert calls == ["forward", "backward"] * 3
    assert_close(results[0], outputs_and_grads(q, k, v, do, layout, "reference"), torch.float32)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_cpu_kernels_built_without_openmp_start_their_own_threads_and_give_the_same_bits(monkeypatch):
    """Where the compiler has no OpenMP the kernels start threads of their own: the same bits as on OpenMP's."""
    from kernels import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip(cpu_kernels.status())
    q, k, v, do = inputs(1280, torch.float32, heads=2, d=32)
    layouts = [make_layout("local", 1280, 32, heads=2, window=100),
               make_layout("strided", 1280, 32, heads=2, stride=40)]
    threads = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(2)
        for openmp in (True, False):
            monkeypatch.setattr(cpu_kernels, "OPENMP", openmp)
            cpu_kernels.library.cache_clear()
            if cpu_kernels.library().uses_openmp() != openmp:
                pytest.skip(f"this compiler builds no OpenMP: {cpu_kernels.status()}")
            results[openmp] = [outputs_and_grads(q, k, v, do, layout, "cpu") for layout in layouts]
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.library.cache_clear()
    for a, b in zip(results[True], results[False], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind,kw,n", [("local", {"window": 70}, 192), ("strided", {"stride": 6}, 192),
                                        ("local", {"window": 40}, 200)], ids=["local", "strided", "local-padded"])
def test_cpu_band_backward_from_kept_probabilities_equals_recomputing_them(kind, kw, n, monkeypatch):
    """The compiled band keeps the forward's probabilities for the backward where they fit (PROBS_KEEP_BYTES) and
    fill their window (PROBS_MIN_FILL), and reuses finished buffers (the pool); recomputing them instead gives the
    same values and grads."""
    from kernels import cpu_attention, cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip(cpu_kernels.status())
    q, k, v, do = inputs(n, torch.float32, heads=3, d=32, batch=2)
    layout = make_layout(kind, n, 32, heads=3, **kw)
    monkeypatch.setattr(cpu_attention, "_probs_pool", [])
    outputs_and_grads(q, k, v, do, layout, "cpu")
    # by default only layouts whose rows fill most of their window keep them
    assert len(cpu_attention._probs_pool) == (cpu_attention._plan(layout).fill >= cpu_attention.PROBS_MIN_FILL)
    monkeypatch.setattr(cpu_attention, "PROBS_MIN_FILL", 0.0)
    monkeypatch.setattr(cpu_attention, "_probs_pool", [])
    kept = [outputs_and_grads(q, k, v, do, layout, "cpu") for _ in range(2)]  # the second from a pooled buffer
    assert len(cpu_attention._probs_pool) == 1
    for other in kept[1:]:
        assert all(torch.equal(a, b) for a, b in zip(kept[0], other, strict=True))
    monkeypatch.setattr(cpu_attention, "PROBS_KEEP_BYTES", 0)
    recomputed = outputs_and_grads(q, k, v, do, layout, "cpu")
    assert_close(kept[0], recomputed, torch.float32)
    assert_close(recomputed, outputs_and_grads(q, k, v, do, layout, "reference"), torch.float32)
    monkeypatch.setattr(cpu_attention, "PROBS_KEEP_BYTES", 1 << 30)
    with torch.no_grad():  # no backward coming: the pooled buffer stays in the pool
        attention(q, k, v, layout, backend="cpu")
    assert len(cpu_attention._probs_pool) == 1


def test_cpu_band_keeps_probabilities_for_local_layouts_but_not_long_strided_columns():
    """The rule behind PROBS_MIN_FILL at the benchmark's sizes: a local window is read in full, a strided grid of 8
    blocks per column about half (there recomputing the probabilities measured faster)."""
    from kernels import cpu_attention

    assert cpu_attention._plan(make_layout("local", 12288, 32, window=192)).fill >= cpu_attention.PROBS_MIN_FILL
    assert cpu_attention._plan(make_layout("strided", 65536, 32, stride=256)).fill < cpu_attention.PROBS_MIN_FILL


def test_cpu_band_built_for_avx2_without_avx512_matches_reference(tmp_path, monkeypatch):
    """A CPU with AVX2 and FMA but no AVX-512 gets 8-wide vectors and the AVX code paths (its transposes and mask
    bits): built here with -mavx2 -mfma in place of -march=native, against the reference."""
    from helpers import avx2_kernels

    with avx2_kernels(tmp_path, monkeypatch):
        for kind, kw in (("local", {"window": 70}), ("strided", {"stride": 6})):
            q, k, v, do = inputs(192, torch.float32, heads=2, d=32, batch=1)
            layout = make_layout(kind, 192, 32, heads=2, **kw)
            assert_close(outputs_and_grads(q, k, v, do, layout, "cpu"),
                         outputs_and_grads(q, k, v, do, layout, "reference"), torch.float32)
