r"""The small experiments behind the first lessons (notebooks 01 and 02, and ``python -m cnet
lessons``): a zero convolution trained from zero, and a controlled block's first steps.

Each function runs a real optimisation and returns plain numbers; plotting lives in
:mod:`cnet.course.plots`, interaction in :mod:`cnet.course.widgets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..block import ControlledBlock
from ..zero_conv import sgd_step, zero_conv, zero_conv_grads

__all__ = [
    "ZeroConvTrajectory",
    "zero_conv_trajectory",
    "ConvNormAct",
    "GradientFlow",
    "gradient_flow",
    "gaussian_connections_",
    "output_deviation",
]


@dataclass
class ZeroConvTrajectory:
    """Per step t (t = 0 is before the first update): ‖W‖, ‖B‖, ‖∂L/∂I‖ and the loss."""

    weight_norm: list[float] = field(default_factory=list)
    bias_norm: list[float] = field(default_factory=list)
    input_grad_norm: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    first_step: list[float] = field(default_factory=list)  # |ΔW| of each entry at update 1


def zero_conv_trajectory(
    lr: float = 0.1,
    input_scale: float = 1.0,
    steps: int = 20,
    channels: tuple[int, int] = (4, 3),
    seed: int = 0,
    optimizer: str = "sgd",
    weight_decay: float = 0.01,
) -> ZeroConvTrajectory:
    r"""Train one zero convolution from :math:`W = B = 0` by plain gradient descent (Eq. 7),
    using only the closed forms of Eq. 5 and Eq. 6, towards a target that a 1×1 convolution can
    reach, :math:`T = Z(I; \{W_\star, B_\star\})`, with the loss
    :math:`L = \tfrac12 \operatorname{mean}_p \lVert Z(I)_p - T_p \rVert^2`.

    Records, before each update, the weight norm (0 at t = 0), and the gradient that would flow
    back to the input, :math:`\lVert \partial L/\partial I \rVert` (0 at t = 0 by Eq. 6,
    non-zero from t = 1 by Eq. 8). ``input_scale = 0`` shows the caveat: with
    :math:`I = 0`, :math:`W` never leaves zero.

    ``optimizer="adamw"`` takes torch's AdamW step (decoupled ``weight_decay``) on the same
    closed-form gradients instead, as training does: its first update moves every entry by
    :math:`-\mathrm{lr}\,g/(|g| + \epsilon) \approx -\mathrm{lr}\,\mathrm{sign}(g)`, whatever the
    size of :math:`g`, where Eq. 7 moves it by :math:`-\mathrm{lr}\,g`.
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer: {optimizer!r} is not allowed; expected 'sgd' or 'adamw'")
    c_in, c_out = channels
    g = torch.Generator().manual_seed(seed)
    I = input_scale * torch.randn(8, c_in, 4, 4, generator=g, dtype=torch.float64)
    W_target = torch.randn(c_out, c_in, generator=g, dtype=torch.float64)
    B_target = torch.randn(c_out, generator=g, dtype=torch.float64)
    T = zero_conv(I, W_target, B_target)
    W = torch.zeros(c_out, c_in, dtype=torch.float64)
    B = torch.zeros(c_out, dtype=torch.float64)
    positions = I.shape[0] * I.shape[2] * I.shape[3]
    out = ZeroConvTrajectory()
    adamw = torch.optim.AdamW([W, B], lr=lr, weight_decay=weight_decay)
    for t in range(steps + 1):
        Z = zero_conv(I, W, B)
        upstream = (Z - T) / positions  # ∂L/∂Z
        grad_I, grad_W, grad_B = zero_conv_grads(I, W, B, upstream)
        out.weight_norm.append(float(W.norm()))
        out.bias_norm.append(float(B.norm()))
        out.input_grad_norm.append(float(grad_I.norm()))
        out.loss.append(float(0.5 * ((Z - T) ** 2).sum() / positions))
        if t == steps:
            break
        before = W.clone()
        if optimizer == "sgd":
            W, B = sgd_step(W, B, grad_W, grad_B, lr)
        else:  # the closed-form gradients, handed to torch's AdamW (updates W, B in place)
            W.grad, B.grad = grad_W, grad_B
            adamw.step()
        if t == 0:
            out.first_step = (W - before).abs().flatten().tolist()
    return out


class ConvNormAct(nn.Sequential):
    """The small block of lesson 02: 3×3 conv, GroupNorm, SiLU, the pattern of SD's ResNets."""

    def __init__(self, channels: int = 8, groups: int = 2):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()
        )


@dataclass
class GradientFlow:
    """Gradient norms per parameter of a :class:`ControlledBlock`, one list entry per step
    (entry 0 is the first backward pass), grouped as the paper names them."""

    theta_c: dict[str, list[float]]
    z1: dict[str, list[float]]
    z2: dict[str, list[float]]
    loss: list[float]
    deviation: list[float]  # ‖y_c − y‖ / ‖y‖ before each step

    def nonzero(self, group: str, step: int) -> int:
        """How many parameter tensors of ``group`` got a non-zero gradient at ``step`` (0-based)."""
        return sum(norms[step] > 0 for norms in getattr(self, group).values())


def gradient_flow(
    controlled: ControlledBlock,
    x: torch.Tensor,
    c: torch.Tensor,
    target: torch.Tensor,
    steps: int = 5,
    lr: float = 1e-2,
) -> GradientFlow:
    r"""Train ``controlled`` for ``steps`` AdamW steps on :math:`\lVert y_c - T \rVert^2` and
    record each trainable parameter's gradient norm at every step, and how far the output is
    from the locked block's before each step (:func:`output_deviation`).

    Step 1: only :math:`\Theta_{z2}` has a non-zero gradient (:math:`\partial Z/\partial I =
    W_{z2} = 0` cuts the path, Eq. 6). Step 2 on: :math:`W_{z2} \ne 0` (Eq. 7), so
    :math:`\Theta_c` and :math:`\Theta_{z1}` learn too (Eq. 8).
    """
    groups = {"theta_c": controlled.theta_c, "z1": controlled.z1, "z2": controlled.z2}
    norms = {g: {n: [] for n, _ in m.named_parameters()} for g, m in groups.items()}
    params = [p for m in groups.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, deviation = [], []
    for _ in range(steps):
        deviation.append(output_deviation(controlled, x, c))
        opt.zero_grad(set_to_none=False)
        loss = ((controlled(x, c) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        for g, module in groups.items():
            for n, p in module.named_parameters():
                norms[g][n].append(float(p.grad.norm()))
        opt.step()
    return GradientFlow(**norms, loss=losses, deviation=deviation)


@torch.no_grad()
def gaussian_connections_(controlled: ControlledBlock, std: float = 0.1, seed: int = 0) -> None:
    r"""Replace both zero convolutions' weights and biases by Gaussian draws
    :math:`\mathcal N(0, \mathrm{std}^2)`: the paper's ablation (ICCV §4.2), where the
    connection is an ordinary initialised layer and Eq. 3–4 no longer hold."""
    g = torch.Generator().manual_seed(seed)
    for z in (controlled.z1, controlled.z2):
        for p in z.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


@torch.no_grad()
def output_deviation(controlled: ControlledBlock, x: torch.Tensor, c: torch.Tensor) -> float:
    r"""How far the controlled output is from the locked block's: :math:`\lVert y_c - y \rVert /
    \lVert y \rVert`. Exactly 0 with zero convolutions at initialisation (Eq. 4)."""
    y = controlled.theta(x)
    return float((controlled(x, c) - y).norm() / y.norm())
