"""BlockSparseLinear and BlockSparseConv2d: initialisation, gradients in a tiny model that trains, and the
conv against torch's conv2d with the masked dense weight (CPU path and interpreted Triton kernels)."""

import pytest
import torch
import torch.nn.functional as F

from kernels import BlockSparseConv2d, BlockSparseLinear, random_layout, small_world_ws
from tests.test_blocksparse import DEVICE, empty_rows_and_cols


def test_linear_initialisation_matches_a_dense_layer_of_the_same_fan_in():
    """Output variance of each output block equals nn.Linear's with fan-in (blocks feeding it) x block."""
    torch.manual_seed(0)
    layout = random_layout(16, 8, 0.25, seed=1)
    layout[:, 0] = False
    layout[:4, 0] = True  # output block 0: fan-in 4 blocks; the others about 4 on average
    layer = BlockSparseLinear(256, 128, layout, 16)
    x = torch.randn(8192, 256)
    with torch.no_grad():
        y = layer(x) - layer.bias
        dense = torch.nn.Linear(4 * 16, 64, bias=False)(x[:, :64])
    var = y.var(0).view(8, 16).mean(1)  # per output block
    want = dense.var(0).mean().item()  # = 1/3 for unit inputs
    assert abs(want - 1 / 3) < 0.03
    assert ((var - want).abs() < 0.05).all(), var
    bound = (layout.sum(0) * 16).double().rsqrt().repeat_interleave(16)
    assert (layer.bias.abs() <= bound).all()
    assert ((layer.weight.abs().amax((1, 2)) <= bound.view(8, 16)[layer.mm.cols, 0]).all())


def test_linear_trains_and_its_gradients_are_right():
    """A tiny model (two block-sparse layers) has the gradients of its dense masked twin, passes a
    finite-difference check, and learns a target that needs both layers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(BlockSparseLinear(32, 64, small_world_ws(4, 2, 0.0).repeat(1, 2), 8, backend="cpu"),
                                torch.nn.Tanh(),
                                BlockSparseLinear(64, 16, random_layout(8, 2, 0.5, seed=2), 8, backend="cpu"))
    x = torch.randn(128, 32)
    target = torch.sin(x @ torch.randn(32, 16) * 0.3)

    def loss_of(model, x):
        return F.mse_loss(model(x), target)

    loss_of(model, x).backward()
    first, second = model[0], model[2]
    w1, w2 = (m.dense_weight().detach().requires_grad_(True) for m in (first, second))
    dense_loss = F.mse_loss(torch.tanh(x @ w1 + first.bias) @ w2 + second.bias, target)
    g1, g2 = torch.autograd.grad(dense_loss, (w1, w2))
    torch.testing.assert_close(first.weight.grad, first.mm.from_dense(g1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(second.weight.grad, second.mm.from_dense(g2), rtol=1e-4, atol=1e-6)

    direction = torch.randn_like(first.weight)  # directional derivative by central differences (float64 copy)
    with torch.no_grad():
        double = [t.double() for t in (first.dense_weight(), first.bias, second.dense_weight(), second.bias)]
        step = first.mm.to_dense(direction).double() * 1e-4

        def f(w1d):
            return F.mse_loss(torch.tanh(x.double() @ w1d + double[1]) @ double[2] + double[3], target.double())

        numeric = (f(double[0] + step) - f(double[0] - step)) / 2e-4
    assert abs((first.weight.grad * direction).sum().item() - numeric.item()) < 1e-4 * max(1.0, abs(numeric.item()))

    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    start = loss_of(model, x).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        optimizer.step()
    assert loss.item() < start / 5


CONV_CASES = [("cpu", 3, 1, 1, 1), ("cpu", (3, 2), 2, (0, 1), 1), ("cpu", 3, 1, 2, 2), ("triton", 3, 1, 1, 1)]


@pytest.mark.parametrize("backend,kernel,stride,padding,dilation", CONV_CASES,
                         ids=["same", "strided", "dilated", "triton"])
def test_conv_matches_torch_conv2d(backend, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    layout = empty_rows_and_cols()[:4]  # [4, 5]: one input block and two output blocks unconnected
    conv = BlockSparseConv2d(32, 40, kernel, layout, 8, stride=stride, padding=padding, dilation=dilation,
                             backend=backend).to(DEVICE)
    x = torch.randn(2, 32, 7, 6, device=DEVICE, requires_grad=True)
    y = conv(x)
    dense = conv.dense_weight().detach().requires_grad_(True)
    want = F.conv2d(x, dense, conv.bias, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(want)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), dy)
    ref = torch.autograd.grad(want, (x, dense, conv.bias), dy)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    dense_grad = ref[1].permute(2, 3, 1, 0).reshape(-1, 40)  # [(kh, kw, in_channels), out_channels]
    torch.testing.assert_close(got[1], conv.mm.from_dense(dense_grad), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    weight = conv.dense_weight()
    assert not weight[0:8].any() and not weight[24:32].any() and not weight[:, 8:16].any()


def test_layers_refuse_bad_arguments():
    layout = random_layout(3, 2, 0.5)
    calls = [
        (lambda: BlockSparseLinear(20, 16, layout, 8), "in_features=20 is not a multiple"),
        (lambda: BlockSparseLinear(32, 16, layout, 8), "the layout has 3"),
        (lambda: BlockSparseLinear(24, 16, layout, 8, backend="gpu"), "backend must be"),
        (lambda: BlockSparseConv2d(24, 16, 3, layout, 8, stride=0), "must be >= 1"),
        (lambda: BlockSparseConv2d(24, 16, (3, 3, 3), layout, 8), "pair of ints"),
        (lambda: BlockSparseConv2d(24, 16, 3, layout, 8)(torch.randn(1, 16, 5, 5)),
         r"x must be \[N, in_channels=24"),
        (lambda: BlockSparseConv2d(24, 16, 5, layout, 8)(torch.randn(1, 24, 3, 3)),
         "smaller than the kernel"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
