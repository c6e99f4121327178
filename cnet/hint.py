r"""The condition encoder :math:`E`: the paper's Eq. 9 (ICCV §3.2).

Stable Diffusion denoises 64×64 latents, but a condition (edges, depth, a segmentation map) is a
512×512 image. ControlNet therefore maps the image-space condition :math:`c_i` into the
latent-space feature :math:`c_f` with a small encoder (**Eq. 9**):

.. math:: c_f = \mathcal{E}(c_i)

and :math:`c_f` enters the trainable copy through a zero convolution, added to the copy's first
features: :math:`x + Z(c_f; \Theta_{z1})` in Eq. 2. The encoder downsamples by the ratio of the
condition's resolution to the latent's (8× for SD: 512 → 64).

The paper's text and the released code describe two different encoders; cnet offers both.

* **Paper** (ICCV §3.2): "four convolution layers with 4×4 kernels and 2×2 strides (activated by
  ReLU, channels are 16, 32, 64, 128, initialized with Gaussian weights)". Four stride-2 layers
  would downsample 16×, not the 8× that SD needs, so :class:`PaperHintEncoder` strides only as
  many of its layers as the factor asks for (the first three for 8×) and keeps the size in the
  rest. A 1×1 zero convolution :math:`Z(\cdot; \Theta_{z1})` maps the 128 channels to the
  U-Net's first channel count.
* **Released code** (``input_hint_block`` in cldm/cldm.py, ``ControlNetConditioningEmbedding``
  in diffusers): eight 3×3 convolutions with SiLU, channels 16, 16, 32, 32, 96, 96, 256 (three
  of them stride 2), the last one a zero-initialised 3×3 convolution to the U-Net's first
  channel count (320 for SD). :class:`ReleasedHintEncoder` *is* diffusers' module, so its
  weights move between cnet, diffusers and the official checkpoints unchanged.

Both end in a zero-initialised convolution, so :math:`E(c_i) = 0` at initialisation whatever
the condition is (Eq. 3).

The prose says *condition encoder* throughout; the class names and the ``hint_encoder`` setting
keep the released code's word for the condition (``hint``), as its checkpoints' keys do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from .zero_conv import ZeroConv2d

__all__ = [
    "EncodedCondition",
    "PAPER_HINT_CHANNELS",
    "RELEASED_HINT_CHANNELS",
    "PaperHintEncoder",
    "ReleasedHintEncoder",
    "downscale_factor_for",
    "make_hint_encoder",
    "released_channels_for",
]

HintEncoderKind = Literal["released", "paper"]


@dataclass(frozen=True)
class EncodedCondition:
    r"""A batch of conditions already encoded, :math:`Z(\mathcal{E}(c_i); \Theta_{z1})`: the term
    the condition adds to the copy's first features in Eq. 2 (``ControlNet.encode_condition``).
    It depends on neither the timestep nor the noisy latent, so a sampler encodes each condition
    once rather than at every step (on the miniature, the encoder is about half of a controlled
    U-Net step on the CPU). It holds only while the encoder's weights stay as they were."""

    features: torch.Tensor
    encoder: int  # id() of the encoder that made it, so that no other ControlNet takes it

    def __getitem__(self, index) -> EncodedCondition:
        return EncodedCondition(self.features[index], self.encoder)


#: Channels of the released encoder's stages (cldm/cldm.py; diffusers' default): one stage at
#: full resolution, then one per stride-2 convolution.
RELEASED_HINT_CHANNELS: tuple[int, ...] = (16, 32, 96, 256)
#: Channels of the paper's four 4×4 convolutions (ICCV §3.2).
PAPER_HINT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)


def _log2_exact(factor: int, what: str) -> int:
    if not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
        raise ValueError(f"{what}: expected a power of two (1, 2, 4, 8, ...), got {factor!r}")
    return int(math.log2(factor))


def downscale_factor_for(
    latent_size: int | Sequence[int], condition_size: int | Sequence[int]
) -> int:
    """The factor E must downsample by: condition resolution / latent resolution, per side.

    Both sizes are an int (square) or (height, width). The ratio must be the same power of two
    on both sides (SD: 512 / 64 = 8), else a ValueError says which sizes would fit.
    """
    lh, lw = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
    ch, cw = (
        (condition_size, condition_size)
        if isinstance(condition_size, int)
        else tuple(condition_size)
    )
    if ch % lh or cw % lw or ch // lh != cw // lw:
        raise ValueError(
            f"condition size {(ch, cw)} is not one power-of-two multiple of the latent size "
            f"{(lh, lw)}: expected (k*{lh}, k*{lw}) with k in 1, 2, 4, 8, ... (SD: 8x)"
        )
    factor = ch // lh
    _log2_exact(factor, f"condition size {(ch, cw)} / latent size {(lh, lw)}")
    return factor


class ReleasedHintEncoder(ControlNetConditioningEmbedding):
    r"""Eq. 9, as released: :math:`c_f = E(c_i)` with 3×3 convolutions and SiLU.

    For ``channels = (16, 32, 96, 256)`` (SD) this is cldm/cldm.py's ``input_hint_block``::

        conv 3→16, SiLU, conv 16→16, SiLU, conv 16→32 /2, SiLU, conv 32→32, SiLU,
        conv 32→96 /2, SiLU, conv 96→96, SiLU, conv 96→256 /2, SiLU, zero conv 256→320 (3×3)

    One stride-2 convolution per stage after the first, so ``len(channels) - 1`` halvings: the
    downsampling factor is ``2 ** (len(channels) - 1)``. Subclasses diffusers'
    ``ControlNetConditioningEmbedding`` (same parameters, same names, same forward), adding the
    sizes cnet checks inputs against.
    """

    def __init__(
        self,
        out_channels: int,
        condition_channels: int = 3,
        channels: Sequence[int] = RELEASED_HINT_CHANNELS,
    ):
        if len(channels) < 1:
            raise ValueError(f"expected at least one stage channel count, got {tuple(channels)}")
        super().__init__(
            conditioning_embedding_channels=out_channels,
            conditioning_channels=condition_channels,
            block_out_channels=tuple(channels),
        )
        self.out_channels = out_channels
        self.condition_channels = condition_channels
        self.channels = tuple(channels)
        self.downscale_factor = 2 ** (len(channels) - 1)

    @property
    def zero_conv(self) -> nn.Conv2d:
        """The zero-initialised last convolution (diffusers and cldm.py call it ``conv_out``,
        a 3×3 ``zero_module``), through which :math:`c_f` enters the copy."""
        return self.conv_out


class PaperHintEncoder(nn.Module):
    r"""Eq. 9, as the paper's text describes it, followed by the zero convolution of Eq. 2.

    .. math:: c_f = \mathrm{ReLU}(\mathrm{conv}_4(\cdots \mathrm{ReLU}(\mathrm{conv}_1(c_i)))),
              \qquad \text{output} = Z(c_f; \Theta_{z1})

    ``conv_k`` are 4×4 convolutions with ``channels`` outputs (16, 32, 64, 128), Gaussian
    initialised (He-normal: std :math:`\sqrt{2 / \text{fan\_in}}`, suited to ReLU; the paper
    gives no std), biases zero. The first :math:`\log_2(\text{downscale\_factor})` layers have
    stride 2 (padding 1, exactly halving even sizes); the others stride 1, padded to keep the
    size.
    The 1×1 zero convolution maps the last channel count to ``out_channels``.
    """

    def __init__(
        self,
        out_channels: int,
        condition_channels: int = 3,
        channels: Sequence[int] = PAPER_HINT_CHANNELS,
        downscale_factor: int = 8,
    ):
        super().__init__()
        halvings = _log2_exact(downscale_factor, "downscale_factor")
        if halvings > len(channels):
            raise ValueError(
                f"the paper encoder halves the size once per layer: {len(channels)} layers "
                f"(channels {tuple(channels)}) reach at most {2 ** len(channels)}x, "
                f"but downscale_factor={downscale_factor} was asked for"
            )
        layers: list[nn.Module] = []
        c_in = condition_channels
        for k, c_out in enumerate(channels):
            stride = 2 if k < halvings else 1
            if stride == 1:
                # A 4x4 kernel keeps the size only with uneven padding (1 before, 2 after).
                layers.append(nn.ZeroPad2d((1, 2, 1, 2)))
            conv = nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=stride - 1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # "Gaussian weights"
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.zero_conv = ZeroConv2d(c_in, out_channels)
        self.out_channels = out_channels
        self.condition_channels = condition_channels
        self.channels = tuple(channels)
        self.downscale_factor = downscale_factor

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        c_f = self.convs(condition)  # Eq. 9
        return self.zero_conv(c_f)  # Z(c_f; Θ_z1)


def released_channels_for(downscale_factor: int) -> tuple[int, ...]:
    """Stage channels of the released encoder for a factor: SD's (16, 32, 96, 256) for 8x, its
    first stages for a smaller factor, and more 256-channel stages for a larger one."""
    stages = _log2_exact(downscale_factor, "downscale_factor") + 1
    base = RELEASED_HINT_CHANNELS
    return base[:stages] + (base[-1],) * max(0, stages - len(base))


def make_hint_encoder(
    kind: HintEncoderKind,
    out_channels: int,
    condition_channels: int = 3,
    downscale_factor: int = 8,
    channels: Sequence[int] | None = None,
) -> ReleasedHintEncoder | PaperHintEncoder:
    """Build E (Eq. 9): ``kind="released"`` (cldm/cldm.py, diffusers) or ``"paper"`` (ICCV §3.2).

    ``out_channels`` is the U-Net's first channel count (320 for SD); ``downscale_factor`` the
    condition-to-latent resolution ratio (8 for SD). ``channels`` overrides the stage channels;
    for the released encoder it must have ``log2(downscale_factor) + 1`` entries.
    """
    if kind == "released":
        channels = (
            tuple(channels) if channels is not None else released_channels_for(downscale_factor)
        )
        expected = _log2_exact(downscale_factor, "downscale_factor") + 1
        if len(channels) != expected:
            raise ValueError(
                f"the released encoder halves the size once per stage after the first: "
                f"downscale_factor={downscale_factor} needs {expected} stage channels, "
                f"got {len(channels)}: {channels}"
            )
        return ReleasedHintEncoder(out_channels, condition_channels, channels)
    if kind == "paper":
        channels = tuple(channels) if channels is not None else PAPER_HINT_CHANNELS
        return PaperHintEncoder(out_channels, condition_channels, channels, downscale_factor)
    raise ValueError(f"hint_encoder: expected 'released' or 'paper', got {kind!r}")
