"""The tanh GELU: the compiled CPU kernels (training) against a float64 reference and PyTorch's own."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import activations, cpu_kernels, gelu

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no compiled CPU kernels here")


def reference(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(x) and dy * GELU'(x) in float64, written without 1 + tanh so that neither end loses digits."""
    x, dy = x.double(), dy.double()
    beta, kappa = math.sqrt(2 / math.pi), 0.044715
    s = torch.sigmoid(2 * beta * (x + kappa * x**3))  # (1 + tanh(u)) / 2
    return x * s, dy * (s + 2 * beta * x * s * (1 - s) * (1 + 3 * kappa * x * x))


def run(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    a = x.clone().requires_grad_()
    y = gelu(a)
    y.backward(dy)
    return y.detach(), a.grad, type(y.grad_fn).__name__


@pytest.mark.parametrize("n", [1, 15, 16, 17, 16384 * 3 + 5])  # partial vectors and several thread items
def test_float32_matches_the_float64_reference(n):
    torch.manual_seed(0)
    x, dy = torch.randn(n) * 4, torch.randn(n)
    y, dx, fn = run(x, dy)
    assert fn == "CompiledGeluBackward"
    y0, dx0 = reference(x, dy)
    # relative 1e-5 (exp of arguments up to 87 keeps about 5e-6); results under 1e-35 may come out as 0
    assert torch.allclose(y.double(), y0, rtol=1e-5, atol=1e-35)
    assert torch.allclose(dx.double(), dx0, rtol=1e-5, atol=1e-6 * dx0.abs().max().item())
    # and PyTorch's tanh GELU, within its own float32 error
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)


def test_bfloat16_is_the_float32_result_rounded_to_nearest_even():
    torch.manual_seed(1)
    n = 16384 * 2 + 9
    x, dy = (torch.randn(n) * 4).bfloat16(), torch.randn(n).bfloat16()
    y, dx, fn = run(x, dy)
    assert fn == "CompiledGeluBackward" and y.dtype == dx.dtype == torch.bfloat16
    y32, dx32, _ = run(x.float(), dy.float())
    assert torch.equal(y, y32.bfloat16()) and torch.equal(dx, dx32.bfloat16())
    y0, _ = reference(x, dy)
    assert ((y.double() - y0).abs() <= 2**-8 * y0.abs() + 1e-35).all()  # within one bfloat16 rounding


def test_nan_stays_nan_and_zero_stays_zero():
    x = torch.tensor([float("nan"), 0.0, -0.0, 30.0, -30.0]).bfloat16()
    y, dx, _ = run(x, torch.ones(5).bfloat16())
    assert y[0].isnan() and dx[0].isnan()
    assert y[1:].tolist() == [0.0, 0.0, 30.0, 0.0] and dx[1:].tolist() == [0.5, 0.5, 1.0, 0.0]


def test_the_far_ends_match_the_reference_in_both_dtypes():
    """Where exp's argument leaves its range (x under about -4.9, over about 9.4) and around it: no NaN, no
    lost digits, and bfloat16 still the float32 result rounded."""
    x = torch.linspace(-12, 12, 24001)
    y, dx, _ = run(x, torch.ones_like(x))
    y0, dx0 = reference(x, torch.ones_like(x))
    assert torch.allclose(y.double(), y0, rtol=1e-5, atol=1e-35)
    assert torch.allclose(dx.double(), dx0, rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    yb, dxb, _ = run(xb, torch.ones_like(xb))
    y32, dx32, _ = run(xb.float(), torch.ones_like(x))
    assert torch.equal(yb, y32.bfloat16()) and torch.equal(dxb, dx32.bfloat16())


def test_without_a_gradient_it_is_pytorchs_gelu_bit_for_bit():
    """Evaluation and sampling keep F.gelu, so that their pinned outputs do not move."""
    x = torch.randn(1000) * 3
    assert torch.equal(gelu(x), F.gelu(x, approximate="tanh"))
    with torch.no_grad():
        assert torch.equal(gelu(x.clone().requires_grad_()), F.gelu(x, approximate="tanh"))


def test_other_inputs_take_pytorchs_gelu(monkeypatch):
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    assert type(gelu(x).grad_fn).__name__ == "GeluBackward0"  # float64
    t = torch.randn(6, 8, requires_grad=True).t()
    assert type(gelu(t).grad_fn).__name__ == "GeluBackward0"  # not contiguous
    monkeypatch.setattr(activations.cpu_kernels, "library", lambda: None)
    assert type(gelu(torch.randn(8, requires_grad=True)).grad_fn).__name__ == "GeluBackward0"


def test_an_avx2_build_matches_the_reference_too(tmp_path, monkeypatch):
    """The 8-wide build (-mavx2 -mfma in place of -march=native): its bfloat16 loads, rounding and tail."""
    from helpers import avx2_kernels

    with avx2_kernels(tmp_path, monkeypatch):
        test_float32_matches_the_float64_reference(16384 + 13)
        test_bfloat16_is_the_float32_result_rounded_to_nearest_even()
        test_nan_stays_nan_and_zero_stays_zero()
        test_the_far_ends_match_the_reference_in_both_dtypes()
