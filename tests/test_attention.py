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
    """The decision is made once, when kernels.triton_attention is imported (as @triton.jit makes it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import kernels.triton_attention as ta, torch; print(ta.INTERPRETED); "
            "print(ta.launch_mode('cpu') if ta.INTERPRETED else ta.launch_mode('cuda'))")
    for value, want in (("1", "True\ninterpreted"), ("0", "False\ncompiled")):
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
