r"""The paper's ablations as ControlNets: other connections, and ControlNet-lite (ICCV §4.2).

The paper argues for two design choices by taking them away (ICCV §4.2, Fig. 8 of the ICCV
version):

* **Zero convolutions.** Replace the zero-initialised 1×1 convolutions by "standard
  convolution layers initialized with Gaussian weights": then the ControlNet adds a random
  residual to the locked U-Net from the very first step (Eq. 4 no longer holds), which the
  paper says damages the backbone's ability at the start. :func:`replace_connections` turns
  the 13 + 1 zero convolutions of a :class:`~cnet.ControlNet` (the 12 + 1 residual ones and the
  condition encoder's last layer) into Gaussian-initialised ones, or removes the 13 residual
  ones altogether (``"none"``: each copy feature is added to its skip connection as it is).
* **The trainable copy.** "ControlNet-lite" replaces each block of the trainable copy by a
  single convolution layer. :func:`make_lite` does so level by level: every layer of every level
  becomes one 3×3 convolution (SiLU before it), every downsampler one stride-2 3×3 convolution,
  the middle block one 3×3 convolution. The lite copy sees the noisy latent and the condition
  only: no timestep, no text (the copied time embedding is locked and unused).

Both keep the ControlNet's interface (12 + 1 residuals, :class:`~cnet.ControlledUNet`), so the
same training loop trains them (``--connections``, ``--connection_gain``,
``--trainable_copy`` of :class:`cnet.train.TrainConfig`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .block import lock
from .controlnet import ControlNet

__all__ = ["CONNECTIONS", "COPIES", "default_init_std", "make_lite", "replace_connections"]

Connections = Literal["zero", "gaussian", "none"]
CONNECTIONS: tuple[str, ...] = ("zero", "gaussian", "none")
COPIES: tuple[str, ...] = ("full", "lite")


def default_init_std(conv: nn.Conv2d) -> float:
    r"""The standard deviation of PyTorch's default initialisation of ``conv``'s weight:
    Kaiming-uniform with :math:`a = \sqrt 5` is :math:`U(-1/\sqrt{n}, 1/\sqrt{n})`, std
    :math:`1/\sqrt{3n}`, with :math:`n` = fan-in = in channels × kernel area."""
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return 1.0 / math.sqrt(3 * fan_in)


@torch.no_grad()
def _gaussian_(
    conv: nn.Conv2d, gain: float, std: float | None, generator: torch.Generator | None
) -> None:
    std = std if std is not None else gain * default_init_std(conv)
    for p in (conv.weight, conv.bias):
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * std)


def replace_connections(
    controlnet: ControlNet,
    kind: Connections,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    std: float | None = None,
) -> ControlNet:
    r"""Give ``controlnet`` other connections than zero convolutions (in place; returns it).

    * ``"zero"``: leave them (the ControlNet of the paper);
    * ``"gaussian"``: the 13 + 1 zero convolutions (12 + 1 residual ones, and the condition
      encoder's last layer) get weights and biases drawn from
      :math:`\mathcal N(0, \sigma^2)`, :math:`\sigma` = ``gain`` × :func:`default_init_std`
      of that layer (``gain`` 1: as large as PyTorch's default initialisation), or
      :math:`\sigma` = ``std`` for every layer where ``std`` is given (e.g. the learning rate:
      the size of AdamW's first step, which moves every zero-convolution weight by about lr);
    * ``"none"``: no connection layer on the 12 + 1 residuals (identity: the copy's features
      are the residuals); the condition encoder's last layer, which maps its channels to the
      copy's, stays a convolution, Gaussian-initialised with ``gain``.
    """
    if kind not in CONNECTIONS:
        raise ValueError(
            f"connections: {kind!r} is not allowed; expected one of " + ", ".join(CONNECTIONS)
        )
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"connection_gain: {gain!r} is not allowed; expected a number > 0")
    if std is not None and not (math.isfinite(std) and std > 0):
        raise ValueError(f"connection_std: {std!r} is not allowed; expected a number > 0")
    if kind == "zero":
        return controlnet
    residual_convs = [*controlnet.zero_convs, controlnet.mid_zero_conv]
    for conv in [*residual_convs, controlnet.hint_encoder.zero_conv]:
        _gaussian_(conv, gain, std, generator)
    if kind == "none":
        controlnet.zero_convs = nn.ModuleList(nn.Identity() for _ in controlnet.zero_convs)
        controlnet.mid_zero_conv = nn.Identity()
    return controlnet


# ------------------------------------------------------------------------------------------
# ControlNet-lite
# ------------------------------------------------------------------------------------------


class _LiteConv(nn.Sequential):
    """SiLU, then one 3×3 convolution: a lite layer (``out_channels`` as the block it
    replaces, so the skip channels stay the same)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, stride, padding=1))


class LiteLevel(nn.Module):
    """One level of the lite copy: a :class:`_LiteConv` per layer of the level it replaces, a
    stride-2 one per downsampler; called as diffusers' down blocks are, and returning the same
    skip features (``temb`` and the text are ignored)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList(
            _LiteConv(r.in_channels, r.out_channels) for r in block.resnets
        )
        downs = block.downsamplers or []
        self.downsamplers = (
            nn.ModuleList(_LiteConv(d.channels, d.out_channels, stride=2) for d in downs)
            if downs
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **_text
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        h, skips = hidden_states, []
        for layer in [*self.resnets, *(self.downsamplers or [])]:
            h = layer(h)
            skips.append(h)
        return h, tuple(skips)


class LiteMiddle(nn.Module):
    """The lite copy's middle block: one :class:`_LiteConv`."""

    def __init__(self, mid_block: nn.Module):
        super().__init__()
        channels = mid_block.resnets[-1].out_channels
        self.resnets = nn.ModuleList([_LiteConv(channels, channels)])

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **_text
    ) -> torch.Tensor:
        return self.resnets[0](hidden_states)


def make_lite(controlnet: ControlNet) -> ControlNet:
    """ControlNet-lite (ICCV §4.2): replace the copied down blocks and middle block of
    ``controlnet`` by :class:`LiteLevel` / :class:`LiteMiddle` (PyTorch's default
    initialisation), and lock the copied time embedding, which the lite copy does not use. The
    copied ``conv_in``, the condition encoder and the zero convolutions stay. In place; returns
    it."""
    weight = controlnet.conv_in.weight
    controlnet.down_blocks = nn.ModuleList(LiteLevel(b) for b in controlnet.down_blocks).to(weight)
    controlnet.mid_block = LiteMiddle(controlnet.mid_block).to(weight)
    lock(controlnet.time_embedding)
    return controlnet
