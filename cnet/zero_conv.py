r"""Zero convolution: the paper's Eq. 5–8 (arXiv v1 §3.1).

A *zero convolution* is a 1×1 convolution whose weight :math:`W` and bias :math:`B` both start
at exactly 0. It is the only new ingredient ControlNet adds between a locked network and its
trainable copy, and the whole argument for why training can start from it fits in four
equations:

* **Eq. 5** writes the 1×1 convolution as an explicit sum over input channels,
  :math:`Z(I; \{W, B\})_{p,i} = B_i + \sum_j I_{p,j} W_{i,j}`.
* **Eq. 6** differentiates it. With :math:`W = B = 0` the gradient to the *input* vanishes
  (:math:`\partial Z/\partial I = W = 0`), but the gradients to the *weight* and *bias* do not
  (:math:`\partial Z/\partial W = I`, :math:`\partial Z/\partial B = 1`).
* **Eq. 7**: so one gradient step moves :math:`W` away from zero, as long as :math:`I \ne 0`.
* **Eq. 8**: and from then on :math:`\partial Z/\partial I = W^* \ne 0`: gradients reach whatever
  sits behind the zero convolution.

Tensors are NCHW, as in PyTorch and diffusers; "position p" is one (n, h, w) triple.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ZeroConv2d", "zero_conv", "zero_conv_grads", "sgd_step"]


class ZeroConv2d(nn.Conv2d):
    r"""A 1×1 convolution whose weight and bias are exactly zero at construction.

    :math:`Z(I; \{W, B\})_{p,i} = B_i + \sum_j I_{p,j} W_{i,j}` (Eq. 5), with :math:`W = 0, B = 0`
    at initialisation. The released code builds the same thing as
    ``zero_module(conv_nd(dims, channels, channels, 1, padding=0))`` (cldm/cldm.py).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__(in_channels, out_channels or in_channels, kernel_size=1, padding=0)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def _as_matrix(W: torch.Tensor) -> torch.Tensor:
    """Accept a conv weight (C_out, C_in, 1, 1) or its matrix (C_out, C_in); return the matrix."""
    if W.dim() == 4 and W.shape[2:] == (1, 1):
        return W[:, :, 0, 0]
    if W.dim() == 2:
        return W
    raise ValueError(
        f"expected a 1x1 conv weight of shape (C_out, C_in, 1, 1) or (C_out, C_in), "
        f"got {tuple(W.shape)}"
    )


def _check_zero_conv_operands(I: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    if I.dim() != 4:
        raise ValueError(f"expected I of shape (N, C_in, H, W), got {tuple(I.shape)}")
    Wm = _as_matrix(W)
    if Wm.shape[1] != I.shape[1]:
        raise ValueError(
            f"W expects C_in={Wm.shape[1]} input channels, but I has {I.shape[1]} "
            f"(I shape {tuple(I.shape)}, W shape {tuple(W.shape)})"
        )
    if B.shape != (Wm.shape[0],):
        raise ValueError(f"expected B of shape ({Wm.shape[0]},), got {tuple(B.shape)}")
    return Wm


def zero_conv(I: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    r"""Eq. 5: a 1×1 convolution written as the explicit sum over input channels.

    .. math:: Z(I; \{W, B\})_{p,i} = B_i + \sum_j I_{p,j}\, W_{i,j}

    ``I`` is (N, C_in, H, W); ``W`` is (C_out, C_in) or the conv weight (C_out, C_in, 1, 1);
    ``B`` is (C_out,). Returns (N, C_out, H, W), equal to ``ZeroConv2d`` with the same W, B.
    """
    Wm = _check_zero_conv_operands(I, W, B)
    return torch.einsum("njhw,ij->nihw", I, Wm) + B[None, :, None, None]


def zero_conv_grads(
    I: torch.Tensor, W: torch.Tensor, B: torch.Tensor, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Eq. 6, for any W and B: the closed-form gradients of a loss L through Eq. 5.

    With the upstream gradient :math:`G_{p,i} = \partial L / \partial Z_{p,i}` and the local
    derivatives :math:`\partial Z_{p,i}/\partial I_{p,j} = W_{i,j}`,
    :math:`\partial Z_{p,i}/\partial W_{i,j} = I_{p,j}`, :math:`\partial Z_{p,i}/\partial B_i = 1`:

    .. math::
        \frac{\partial L}{\partial I_{p,j}} = \sum_i G_{p,i} W_{i,j}, \qquad
        \frac{\partial L}{\partial W_{i,j}} = \sum_p G_{p,i} I_{p,j}, \qquad
        \frac{\partial L}{\partial B_i} = \sum_p G_{p,i}.

    At :math:`W = 0` the first is exactly zero whatever G and I are; the second is zero only
    where the input is. Returns ``(dL/dI, dL/dW, dL/dB)``, dL/dW shaped like ``W``.
    """
    Wm = _check_zero_conv_operands(I, W, B)
    expected = (I.shape[0], Wm.shape[0], I.shape[2], I.shape[3])
    if tuple(upstream.shape) != expected:
        raise ValueError(
            f"expected upstream dL/dZ of shape {expected}, got {tuple(upstream.shape)}"
        )
    grad_I = torch.einsum("nihw,ij->njhw", upstream, Wm)
    grad_W = torch.einsum("nihw,njhw->ij", upstream, I).reshape(W.shape)
    grad_B = upstream.sum(dim=(0, 2, 3))
    return grad_I, grad_W, grad_B


def sgd_step(
    W: torch.Tensor, B: torch.Tensor, grad_W: torch.Tensor, grad_B: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Eq. 7: one plain gradient-descent step on the zero convolution's parameters.

    .. math:: W^* = W - \beta_{lr} \cdot \frac{\partial L}{\partial W}, \qquad
              B^* = B - \beta_{lr} \cdot \frac{\partial L}{\partial B}

    From :math:`W = 0`, :math:`W^* \ne 0` as soon as :math:`\beta_{lr} \ne 0` and
    :math:`\partial L/\partial W = \sum_p G_{p,i} I_{p,j} \ne 0`, i.e. the input is non-zero
    somewhere the upstream gradient is. Then Eq. 8:
    :math:`\partial Z(I; \{W^*, B^*\})_{p,i} / \partial I_{p,j} = W^*_{i,j} \ne 0`.
    """
    return W - lr * grad_W, B - lr * grad_B
