"""Layer norm: the compiled CPU kernels (training) against a float64 reference and PyTorch's own."""

import pytest
import torch
import torch.nn.functional as F

from kernels import LayerNorm, cpu_kernels, layer_norm
from kernels.layer_norm import CompiledLayerNorm

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no compiled CPU kernels here")


def inputs(rows: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * 3 + 1
    w = torch.randn(d, generator=g) * 0.5 + 1
    b = torch.randn(d, generator=g) * 0.1
    dy = torch.randn(rows, d, generator=g)
    return x, w, b, dy


def run(fn, x, w, b, dy, autocast: bool = False):
    """y and the gradients of x, w and b, with dy in y's dtype."""
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, w, b)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad, b.grad, y.grad_fn


def ours(x, w, b):
    return layer_norm(x, w, b, 1e-5)


def reference(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


@pytest.mark.parametrize("rows,d", [(1, 192), (63, 64), (64, 192), (300, 256), (1000, 32)])  # partial items
def test_float32_matches_the_float64_reference(rows, d):
    if d % cpu_kernels.vector_floats():
        pytest.skip("d is not a multiple of this build's vector")
    x, w, b, dy = inputs(rows, d)
    y, dx, dw, db, fn = run(ours, x, w, b, dy)
    assert type(fn).__name__ == "CompiledLayerNormBackward" and y.dtype == torch.float32
    y0, dx0, dw0, db0, _ = run(reference, *(t.double() for t in (x, w, b, dy)))
    torch.testing.assert_close(y.double(), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.double(), db0, rtol=1e-5, atol=1e-4)


def test_under_bfloat16_autocast_it_writes_bfloat16_the_float32_result_rounded():
    x, w, b, dy = inputs(200, 192, seed=1)
    y, dx, dw, db, fn = run(ours, x, w, b, dy, autocast=True)
    assert type(fn).__name__ == "CompiledLayerNormBackward"
    assert y.dtype == torch.bfloat16 and dx.dtype == dw.dtype == db.dtype == torch.float32
    y32 = run(ours, x, w, b, dy)[0]
    assert torch.equal(y, y32.bfloat16())
    # the backward takes dy in bfloat16: the same as float32 given the rounded dy
    _, dx32, dw32, db32, _ = run(ours, x, w, b, dy.bfloat16().float())
    assert torch.equal(dx, dx32) and torch.equal(dw, dw32) and torch.equal(db, db32)


def test_the_sums_do_not_depend_on_the_thread_count():
    x, w, b, dy = inputs(1000, 192, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(ours, x, w, b, dy)[:4]
        torch.set_num_threads(2)
        two = run(ours, x, w, b, dy)[:4]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(one, two, strict=True))


def test_without_a_gradient_it_is_pytorchs_layer_norm_bit_for_bit():
    """Evaluation and sampling keep F.layer_norm, so that their pinned outputs do not move."""
    x, w, b, _ = inputs(50, 192)
    assert torch.equal(layer_norm(x, w, b, 1e-5), F.layer_norm(x, (192,), w, b, 1e-5))
    with torch.no_grad():
        assert torch.equal(layer_norm(x.requires_grad_(), w, b, 1e-5), F.layer_norm(x, (192,), w, b, 1e-5))


def test_other_inputs_take_pytorchs_layer_norm(monkeypatch):
    x, w, b, _ = inputs(8, 64)
    w.requires_grad_()
    assert type(layer_norm(x.double(), w.double(), b.double(), 1e-5).grad_fn).__name__ != "CompiledLayerNormBackward"
    assert type(layer_norm(x.t().contiguous().t(), w, b, 1e-5).grad_fn).__name__ != "CompiledLayerNormBackward"
    x7, w7, b7 = torch.randn(8, 7), torch.ones(7, requires_grad=True), torch.zeros(7)  # d not a whole vector
    assert type(layer_norm(x7, w7, b7, 1e-5).grad_fn).__name__ != "CompiledLayerNormBackward"
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    monkeypatch.setattr(cpu_kernels, "vector_floats", lambda: 0)
    assert type(layer_norm(x, w, b, 1e-5).grad_fn).__name__ != "CompiledLayerNormBackward"


def test_the_module_keeps_nn_layernorms_parameters_and_state_dict():
    torch.manual_seed(0)
    ours_, theirs = LayerNorm(64), torch.nn.LayerNorm(64)
    assert ours_.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 5, 64, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(ours_(x), theirs(x))
    assert type(ours_(x).grad_fn).__name__ == "CompiledLayerNormBackward"
    assert isinstance(ours_, torch.nn.LayerNorm) and CompiledLayerNorm is not None


@pytest.mark.parametrize("kwargs", [{"normalized_shape": (4, 64)}, {"normalized_shape": 64, "bias": False},
                                    {"normalized_shape": 64, "elementwise_affine": False}])
def test_the_module_keeps_nn_layernorms_other_settings(kwargs):
    torch.manual_seed(0)
    ours_, theirs = LayerNorm(**kwargs), torch.nn.LayerNorm(**kwargs)
    x = torch.randn(3, 4, 64, requires_grad=True)
    y = ours_(x)
    assert torch.equal(y, theirs(x)) and type(y.grad_fn).__name__ != "CompiledLayerNormBackward"


def test_an_avx2_build_matches_the_reference_too(tmp_path, monkeypatch):
    """The 8-wide build (-mavx2 -mfma in place of -march=native): its loads, stores and partial items."""
    from helpers import avx2_kernels

    with avx2_kernels(tmp_path, monkeypatch):
        test_float32_matches_the_float64_reference(63, 64)
        test_under_bfloat16_autocast_it_writes_bfloat16_the_float32_result_rounded()
        test_the_sums_do_not_depend_on_the_thread_count()
