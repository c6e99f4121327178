"""Eq. 5–8: the zero convolution's forward and its closed-form gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnet import ZeroConv2d, sgd_step, zero_conv, zero_conv_grads

shapes = st.tuples(
    st.integers(1, 3),  # N
    st.integers(1, 6),  # C_in
    st.integers(1, 6),  # C_out
    st.integers(1, 5),  # H
    st.integers(1, 5),  # W
)


def _operands(shape, seed, zero_params):
    n, c_in, c_out, h, w = shape
    g = torch.Generator().manual_seed(seed)
    I = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    if zero_params:
        W = torch.zeros(c_out, c_in, 1, 1, dtype=torch.float64)
        B = torch.zeros(c_out, dtype=torch.float64)
    else:
        W = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64)
        B = torch.randn(c_out, generator=g, dtype=torch.float64)
    G = torch.randn(n, c_out, h, w, generator=g, dtype=torch.float64)
    return I, W, B, G


def test_zero_conv_module_starts_at_zero():
    z = ZeroConv2d(5, 7)
    assert z.kernel_size == (1, 1) and z.weight.shape == (7, 5, 1, 1)
    assert torch.count_nonzero(z.weight) == 0 and torch.count_nonzero(z.bias) == 0
    assert torch.count_nonzero(z(torch.randn(2, 5, 4, 3))) == 0
    assert ZeroConv2d(4).out_channels == 4


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), zero_params=st.booleans())
def test_eq5_explicit_sum_equals_module_forward(shape, seed, zero_params):
    I, W, B, _ = _operands(shape, seed, zero_params)
    z = ZeroConv2d(I.shape[1], W.shape[0]).double()
    with torch.no_grad():
        z.weight.copy_(W)
        z.bias.copy_(B)
    torch.testing.assert_close(zero_conv(I, W, B), z(I), rtol=0, atol=1e-12)
    # the (C_out, C_in) matrix form gives the same result
    torch.testing.assert_close(zero_conv(I, W[:, :, 0, 0], B), z(I), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), zero_params=st.booleans())
def test_eq6_closed_form_matches_autograd_float64(shape, seed, zero_params):
    I, W, B, G = _operands(shape, seed, zero_params)
    I_, W_, B_ = (t.clone().requires_grad_(True) for t in (I, W, B))
    (zero_conv(I_, W_, B_) * G).sum().backward()
    grad_I, grad_W, grad_B = zero_conv_grads(I, W, B, G)
    for closed, auto in ((grad_I, I_.grad), (grad_W, W_.grad), (grad_B, B_.grad)):
        assert closed.shape == auto.shape
        assert (closed - auto).abs().max() <= 1e-12


def test_eq6_input_gradient_vanishes_weight_gradient_does_not():
    I, W, B, G = _operands((2, 3, 4, 5, 5), seed=0, zero_params=True)
    grad_I, grad_W, grad_B = zero_conv_grads(I, W, B, G)
    assert torch.count_nonzero(grad_I) == 0  # dZ/dI = W = 0
    assert torch.count_nonzero(grad_W) == grad_W.numel()  # dZ/dW = I != 0
    assert torch.count_nonzero(grad_B) == grad_B.numel()  # dZ/dB = 1


def _central_differences(f, x, eps=1e-6):
    """d f / d x by central finite differences, element by element (f scalar-valued)."""
    grad = torch.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for k in range(flat.numel()):
        saved = flat[k].item()
        flat[k] = saved + eps
        up = f()
        flat[k] = saved - eps
        down = f()
        flat[k] = saved
        out[k] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("at", ["W = 0", "random W"])
def test_closed_form_matches_finite_differences_of_eq5(at):
    # L = sum(Z(I; W, B) * G): dL/dZ = G, and the closed form of Eq. 6 must agree with the
    # numerical derivative of cnet's own Eq. 5 in every entry of I, W and B (C_in != C_out,
    # so a transposed W cannot pass by symmetry).
    I, W, B, G = _operands((2, 3, 4, 5, 4), seed=5, zero_params=(at == "W = 0"))
    assert (torch.count_nonzero(W) == 0) == (at == "W = 0")

    def loss():
        return (zero_conv(I, W, B) * G).sum().item()

    numeric = [_central_differences(loss, t) for t in (I, W, B)]
    closed = zero_conv_grads(I, W, B, G)
    for name, c, n in zip(("dL/dI", "dL/dW", "dL/dB"), closed, numeric):
        assert c.shape == n.shape, name
        torch.testing.assert_close(c, n, rtol=1e-6, atol=1e-7, msg=name)
    assert numeric[1].abs().max() > 0.1 and numeric[2].abs().max() > 0.1
    if at == "W = 0":
        assert numeric[0].abs().max() < 1e-7  # Eq. 6: dZ/dI = W = 0
    else:
        assert numeric[0].abs().max() > 0.1


def test_eq7_eq8_one_step_moves_w_and_opens_the_input_gradient():
    I, W, B, G = _operands((2, 3, 4, 5, 5), seed=1, zero_params=True)
    _, grad_W, grad_B = zero_conv_grads(I, W, B, G)
    W_star, B_star = sgd_step(W, B, grad_W, grad_B, lr=0.1)
    assert torch.count_nonzero(W_star) == W_star.numel()  # Eq. 7: W* != 0
    grad_I, _, _ = zero_conv_grads(I, W_star, B_star, G)
    assert torch.count_nonzero(grad_I) > 0  # Eq. 8: dZ/dI = W* != 0
    # and autograd agrees that dZ_{p,i}/dI_{p,j} is W*_{i,j}: a one-pixel probe
    probe = torch.zeros(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda x: zero_conv(x, W_star, B_star), probe)
    assert torch.equal(jac.reshape(4, 3), W_star[:, :, 0, 0])


def test_eq7_caveat_zero_input_keeps_w_at_zero():
    _, W, B, G = _operands((2, 3, 4, 5, 5), seed=2, zero_params=True)
    I = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    _, grad_W, grad_B = zero_conv_grads(I, W, B, G)
    W_star, B_star = sgd_step(W, B, grad_W, grad_B, lr=0.1)
    assert torch.count_nonzero(W_star) == 0  # "as long as I is non-zero"
    assert torch.count_nonzero(B_star) > 0  # the bias still learns: dZ/dB = 1


def test_the_same_facts_through_torch_sgd():
    torch.manual_seed(0)
    z = ZeroConv2d(3, 4).double()
    opt = torch.optim.SGD(z.parameters(), lr=0.5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ((z(x) - target) ** 2).mean().backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(z.weight.grad) > 0
    opt.step()
    x.grad = None
    ((z(x) - target) ** 2).mean().backward()
    assert torch.count_nonzero(x.grad) == x.numel()


@pytest.mark.parametrize(
    "I_shape, W_shape, B_shape, G_shape, match",
    [
        ((2, 3, 4), (4, 3), (4,), None, r"\(N, C_in, H, W\)"),
        ((2, 3, 4, 4), (4, 5), (4,), None, "C_in=5"),
        ((2, 3, 4, 4), (4, 3, 3, 3), (4,), None, r"\(C_out, C_in, 1, 1\)"),
        ((2, 3, 4, 4), (4, 3), (3,), None, r"B of shape \(4,\)"),
        ((2, 3, 4, 4), (4, 3), (4,), (2, 3, 4, 4), r"\(2, 4, 4, 4\)"),
    ],
)
def test_bad_shapes_raise_clear_errors(I_shape, W_shape, B_shape, G_shape, match):
    I, W, B = torch.zeros(I_shape), torch.zeros(W_shape), torch.zeros(B_shape)
    with pytest.raises(ValueError, match=match):
        if G_shape is None:
            zero_conv(I, W, B)
        else:
            zero_conv_grads(I, W, B, torch.zeros(G_shape))
