"""BlockSparseMatMul: the CPU paths (compiled C and the PyTorch schedule) and the Triton kernels (interpreted
on the CPU) match the dense masked reference in values and gradients, for every block size, dtype and kind
of layout; bad input is refused."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import needs_compiler

import kernels.blocksparse_cpu as cpu
from kernels import BlockSparseMatMul, random_layout, small_world_ba, small_world_ws

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def empty_rows_and_cols() -> torch.Tensor:
    """[6, 5] with input blocks 1 and 4 feeding nothing and output blocks 0 and 3 fed by nothing."""
    layout = random_layout(6, 5, 0.6, seed=3)
    layout[[1, 4]] = False
    layout[:, [0, 3]] = False
    return layout


LAYOUTS = {
    "random-0.15": lambda: random_layout(6, 5, 0.15, seed=1),
    "random-0.5": lambda: random_layout(6, 5, 0.5, seed=2),
    "random-full": lambda: random_layout(5, 6, 1.0),
    "small-world-ws": lambda: small_world_ws(6, 2, 0.3, seed=4),
    "small-world-ba": lambda: small_world_ba(6, 2, seed=5),
    "empty-rows-cols": empty_rows_and_cols,
}


def inputs(mm: BlockSparseMatMul, dtype: torch.dtype, lead=(2, 11), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, mm.in_features, generator=g).to(device, dtype)
    w = torch.randn(mm.w_shape, generator=g).to(device, dtype)
    dy = torch.randn(*lead, mm.out_features, generator=g).to(device, dtype)
    return x, w, dy


def run(mm, x, w, dy, backend):
    x, w = (t.detach().clone().requires_grad_(True) for t in (x, w))
    y = mm(x, w, backend=backend)
    return (y, *torch.autograd.grad(y, (x, w), dy))


def assert_close(got, want, dtype):
    """Max error relative to the largest reference value, per tensor (y, dx, dw)."""
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype, name
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.fixture
def pytorch_schedule(monkeypatch):
    """The CPU backend without its compiled C (as without a compiler): the PyTorch schedule runs float32 too."""
    monkeypatch.setattr(cpu.cpu_kernels, "library", lambda: None)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("block", [8, 16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_matches_reference(layout, block, dtype):
    mm = BlockSparseMatMul(LAYOUTS[layout](), block)
    x, w, dy = inputs(mm, dtype)
    assert_close(run(mm, x, w, dy, "cpu"), run(mm, x, w, dy, "reference"), dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("block", [16, 32, 64])
def test_cpu_pytorch_schedule_matches_reference_in_float32(pytorch_schedule, layout, block):
    mm = BlockSparseMatMul(LAYOUTS[layout](), block)
    x, w, dy = inputs(mm, torch.float32)
    assert_close(run(mm, x, w, dy, "cpu"), run(mm, x, w, dy, "reference"), torch.float32)


@needs_compiler
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 13, 150])
def test_compiled_runs_float32_and_matches_reference_on_any_thread_count(monkeypatch, block, tokens):
    """float32 products with blocks of 16-64 run in C (tile edges: 1, 13 and 150 tokens; dW's token chunks
    at 150), give the same bits on 1, 2 and 3 threads, and a non-finite weight block reaches only its outputs."""
    if cpu.cpu_kernels.library() is None:
        pytest.skip(cpu.cpu_kernels.status())
    calls = []
    compiled_mm = cpu._compiled_mm
    monkeypatch.setattr(cpu, "_compiled_mm", lambda *a, **k: calls.append(k["forward"]) or compiled_mm(*a, **k))
    mm = BlockSparseMatMul(small_world_ba(6, 2, seed=5), block)
    x, w, dy = inputs(mm, torch.float32, lead=(tokens,))
    want = run(mm, x, w, dy, "reference")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(mm, x, w, dy, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert calls == [True, False] * 3
    assert_close(results[0], want, torch.float32)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    j = mm.cols[0].item()  # w[0] feeds output block j only
    w[0] = float("inf")
    y = mm(x, w, backend="cpu").view(tokens, -1, block)
    assert not torch.isfinite(y[:, j]).all()
    assert torch.isfinite(y[:, [c for c in range(mm.out_blocks) if c != j]]).all()


def test_compiled_can_be_turned_off_and_says_why():
    """STS_COMPILED_KERNELS=0: the PyTorch schedule runs, and cpu_kernels.status() says so."""
    code = ("import torch; import kernels.blocksparse_cpu as c; from kernels import BlockSparseMatMul, random_layout;"
            "mm = BlockSparseMatMul(random_layout(3, 3, 0.5), 32); print(c.cpu_kernels.status());"
            "c._compiled_mm = None; print(mm(torch.randn(5, 96), torch.randn(mm.w_shape)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "STS_COMPILED_KERNELS": "0"}).stdout
    assert "unavailable: turned off (STS_COMPILED_KERNELS=0)" in out and "torch.Size([5, 96])" in out


TRITON_CASES = [(layout, block, dtype) for layout in ("random-0.5", "empty-rows-cols") for block in (8, 16, 32, 64)
                for dtype in (torch.float32, torch.bfloat16)]
TRITON_CASES += [("small-world-ws", 16, torch.float16), ("random-0.15", 32, torch.float16),
                 ("small-world-ba", 8, torch.float32), ("random-full", 64, torch.bfloat16)]


@pytest.mark.parametrize("layout,block,dtype", TRITON_CASES,
                         ids=[f"{la}-{b}-{DTYPE_IDS[DTYPES.index(d)]}" for la, b, d in TRITON_CASES])
def test_triton_matches_reference(layout, block, dtype):
    """Under TRITON_INTERPRET=1 (set by conftest without a GPU) the same kernels run on the CPU."""
    mm = BlockSparseMatMul(LAYOUTS[layout](), block)
    x, w, dy = inputs(mm, dtype, lead=(19,), device=DEVICE)  # 19 tokens: a partial tile
    assert_close(run(mm, x, w, dy, "triton"), run(mm, x, w, dy, "reference"), dtype)


@pytest.mark.parametrize("backend,block", [("cpu", 16), ("cpu", 32), ("triton", 16)])
def test_non_contiguous_and_3d_inputs(backend, block):
    mm = BlockSparseMatMul(empty_rows_and_cols(), block)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, mm.in_features * 2, 5, generator=g).to(DEVICE).requires_grad_(True)
    w_base = torch.randn(block, block, mm.nnz, generator=g).to(DEVICE).requires_grad_(True)
    dy = torch.randn(5, 3, mm.out_features, generator=g).to(DEVICE)

    def grads(backend):
        x = base[:, ::2].permute(2, 0, 1)  # [5, 3, in] with strides of neither kind
        w = w_base.permute(2, 1, 0)  # [nnz, b, b] transposed view
        assert not x.is_contiguous() and not w.is_contiguous()
        y = mm(x, w, backend=backend)
        return (y, *torch.autograd.grad(y, (base, w_base), dy))

    for got, want in zip(grads(backend), grads("reference"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_the_needed_gradient_is_computed():
    mm = BlockSparseMatMul(random_layout(4, 4, 0.5), 8)
    x, w, dy = inputs(mm, torch.float32)
    for backend in ("cpu", "triton"):
        w_only = w.clone().requires_grad_(True)
        mm(x, w_only, backend=backend).backward(dy)
        torch.testing.assert_close(w_only.grad, run(mm, x, w, dy, "reference")[2])
        x_only = x.clone().requires_grad_(True)
        mm(x_only, w, backend=backend).backward(dy)
        torch.testing.assert_close(x_only.grad, run(mm, x, w, dy, "reference")[1])


def test_cpu_tiles_split_tokens_and_blocks(pytorch_schedule, monkeypatch):
    """Tiny tiles: several output blocks per group split, tokens split (dW sums over token tiles)."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(cpu, "MIN_TOKENS", 4)
    mm = BlockSparseMatMul(random_layout(7, 6, 0.4, seed=9), 32)
    x, w, dy = inputs(mm, torch.float32, lead=(37,))
    assert_close(run(mm, x, w, dy, "cpu"), run(mm, x, w, dy, "reference"), torch.float32)


@pytest.mark.parametrize("tokens", [22, 130])
@pytest.mark.parametrize("block", [8, 16])
def test_cpu_small_float32_blocks_take_torch_bsr_where_measured_faster(pytorch_schedule, monkeypatch, tokens,
                                                                       block):
    """In the PyTorch schedule, float32 blocks of 8 and 16 run dX through torch's BSR mm, and block 8 its
    forward too from 128 tokens; both that and the gather schedule, which they would take otherwise (and take
    for dW), are right."""
    calls = []
    bsr_product = cpu._bsr_product
    monkeypatch.setattr(cpu, "_bsr_product", lambda *a, **k: calls.append(k["forward"]) or bsr_product(*a, **k))
    mm = BlockSparseMatMul(empty_rows_and_cols(), block)
    x, w, dy = inputs(mm, torch.float32, lead=(tokens,))
    want = run(mm, x, w, dy, "reference")
    assert_close(run(mm, x, w, dy, "cpu"), want, torch.float32)
    assert calls == ([True] if block == 8 and tokens >= 128 else []) + [False]
    monkeypatch.setattr(cpu, "BSR_MAX_BLOCK", 0)
    mm = BlockSparseMatMul(empty_rows_and_cols(), block)
    assert mm.cpu_plan.bsr is None
    assert_close(run(mm, x, w, dy, "cpu"), want, torch.float32)


def test_cpu_groups_pad_unequal_counts(pytorch_schedule):
    """Rows and columns with different block counts share padded groups; padding reads zero weights."""
    layout = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 1, 1]])
    plan = cpu.cpu_plan(*layout.nonzero().unbind(1), 4, 4, 32)
    for schedule in (plan.by_col, plan.by_row):
        assert sum(g.dst.numel() for g in schedule.groups) == 4
        assert any(g.pads for g in schedule.groups)
        assert sorted(schedule.order.tolist()) == [0, 1, 2, 3]
    mm = BlockSparseMatMul(layout, 32)
    x, w, dy = inputs(mm, torch.float32)
    assert_close(run(mm, x, w, dy, "cpu"), run(mm, x, w, dy, "reference"), torch.float32)
    w[0] = float("inf")  # a padded slot reads block 0's position: it must contribute zero, not inf * 0
    y = mm(x, w, backend="cpu")
    assert not torch.isfinite(y[..., :32]).all() and torch.isfinite(y[..., 32:]).all()


def test_triton_weight_gradient_split_over_tokens(monkeypatch):
    """With few blocks and many tokens the dW kernel splits the tokens; torch sums the partial blocks."""
    import kernels.blocksparse_triton as tri

    monkeypatch.setattr(tri, "dw_splits", lambda nnz, tokens, device: 3)
    mm = BlockSparseMatMul(random_layout(3, 2, 0.5, seed=1), 16)
    x, w, dy = inputs(mm, torch.bfloat16, lead=(200,), device=DEVICE)
    assert_close(run(mm, x, w, dy, "triton"), run(mm, x, w, dy, "reference"), torch.bfloat16)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_tokens(backend):
    mm = BlockSparseMatMul(random_layout(3, 2, 0.5), 8)
    x, w, dy = inputs(mm, torch.float32, lead=(0,), device=DEVICE)
    y, dx, dw = run(mm, x, w, dy, backend)
    assert y.shape == (0, 16) and dx.shape == (0, 24) and not dw.any()


def test_dense_round_trip_and_auto_backend():
    layout = small_world_ws(6, 2, 0.5, seed=2)
    mm = BlockSparseMatMul(layout, 8)
    w = torch.randn(mm.w_shape)
    dense = mm.to_dense(w)
    mask = layout.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert dense.shape == (48, 48) and not dense[~mask].any()
    k = 0
    for i, j in layout.nonzero().tolist():  # row-major order of the non-zero blocks
        assert torch.equal(dense[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8], w[k])
        k += 1
    assert torch.equal(mm.from_dense(dense), w)
    assert torch.equal(mm.from_dense(torch.randn(48, 48) * ~mask), torch.zeros_like(w))
    x = torch.randn(4, 48)
    torch.testing.assert_close(mm(x, w), x @ dense)
    assert torch.equal(mm(x, w), mm(x, w, backend="cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernels keep the inputs' precision
        assert mm(x, w).dtype == torch.float32


def test_bad_inputs_name_the_problem(monkeypatch):
    mm = BlockSparseMatMul(random_layout(3, 2, 0.5), 8)
    x, w, _ = inputs(mm, torch.float32)
    calls = [
        (lambda: BlockSparseMatMul(torch.ones(2, 2), 12), "block must be one of"),
        (lambda: BlockSparseMatMul(torch.ones(2, 2), 8.0), "block must be one of"),
        (lambda: BlockSparseMatMul(torch.zeros(2, 2), 8), "no non-zero block"),
        (lambda: BlockSparseMatMul(torch.ones(2, 2, 2), 8), "2-D 0/1 array"),
        (lambda: BlockSparseMatMul([[0, 2]], 8), "only 0 and 1"),
        (lambda: BlockSparseMatMul("dense", 8), "2-D 0/1 array"),
        (lambda: mm(x[..., :16], w), "in_features=24"),
        (lambda: mm(x.double(), w.double()), "dtype torch.float64"),
        (lambda: mm(x, w[:-1]), "w_shape"),
        (lambda: mm(x, w.bfloat16()), "same dtype"),
        (lambda: mm(x, w.to("meta")), "same device"),
        (lambda: mm(x.to("meta"), w.to("meta"), backend="cpu"), "needs CPU tensors"),
        (lambda: mm(x, w, backend="cuda"), "backend must be one of"),
        (lambda: mm([1.0], w), "x must be a torch.Tensor"),
        (lambda: mm.to_dense(w[:, :4]), "w_shape"),
        (lambda: mm.from_dense(torch.zeros(16, 24)), r"weight must be a tensor \[24, 16\]"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
    import kernels.blocksparse_triton  # interpreted or compiled is decided when the kernels are imported

    assert kernels.blocksparse_triton.INTERPRETED  # tests/conftest.py sets TRITON_INTERPRET=1 first
    monkeypatch.setattr(kernels.blocksparse_triton, "INTERPRETED", False)  # as on a GPU machine: CPU tensors refused
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        mm(x, w, backend="triton")
