r"""T2I-Adapter on the locked U-Net: the method that followed ControlNet with the smallest change
to Eq. 2 (Mou et al., "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models", arXiv:2302.08453, AAAI 2024).

Where ControlNet runs a trainable copy of the U-Net's encoder at every denoising step and adds
its zero-convolved outputs to the skip connections (Eq. 2), an adapter is a small network of its
own, :math:`F_{AD}`, that reads the condition **once**, with no timestep and no prompt, and
returns one feature map per encoder level, :math:`F_c = F_{AD}(c)`; each is added to the
locked encoder's features at the end of its level (the paper's Eq. 2–3, with a condition
weight :math:`\omega`):

.. math:: \hat F^i_{enc} = F^i_{enc} + \omega\, F^i_c, \quad i = 1, \dots, 4.

diffusers implements both parts: ``T2IAdapter`` (the full adapter: pixel-unshuffle, then
residual blocks that halve the resolution from level to level) and the U-Net's
``down_intrablock_additional_residuals``, which adds one map per down block, inside it. This
module sizes the adapter for a given U-Net and puts the two together, as
:class:`~cnet.ControlledUNet` does for ControlNets; :func:`cnet.sample` samples it as diffusers'
``StableDiffusionAdapterPipeline`` does (``tests/core/test_adapter.py`` checks the images).
Nothing of the adapter starts at zero: unlike a ControlNet, an untrained adapter changes the
base's output from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import T2IAdapter, UNet2DConditionModel
from torch import nn

from .block import lock

__all__ = ["AdaptedUNet", "t2i_adapter_for"]


def t2i_adapter_for(
    unet: UNet2DConditionModel, image_size: int, in_channels: int = 3, num_res_blocks: int = 2
) -> T2IAdapter:
    """diffusers' full T2I-Adapter whose feature maps match ``unet``'s down blocks: one per
    block, with the block's channels (``block_out_channels``), the first at the latent's
    resolution (the condition, ``image_size`` pixels square, pixel-unshuffled by the VAE's
    factor), each next at half the one before, as the blocks' downsamplers leave them. SD1.5's
    U-Net gets the released adapters' shape: channels 320, 640, 1280, 1280, factor 8."""
    factor, rest = divmod(image_size, unet.config.sample_size)
    if rest or factor < 1:
        raise ValueError(
            f"image_size: {image_size} is not allowed; expected a multiple of the U-Net's "
            f"latent size {unet.config.sample_size}"
        )
    return T2IAdapter(
        in_channels=in_channels,
        channels=list(unet.config.block_out_channels),
        num_res_blocks=num_res_blocks,
        downscale_factor=factor,
        adapter_type="full_adapter",
    )


class AdaptedUNet(nn.Module):
    """The locked U-Net with a T2I-Adapter, or several: ``unet`` is locked in place
    (:func:`cnet.lock`); the adapters' features, each times its condition weight ``scale``
    (diffusers' ``adapter_conditioning_scale``), are added inside the U-Net's down blocks.
    Several adapters compose as diffusers' ``MultiAdapter`` composes them: their weighted
    features summed, level by level (the composable adapters of T2I-Adapter's paper)."""

    def __init__(self, unet: UNet2DConditionModel, adapter: T2IAdapter | Sequence[T2IAdapter]):
        super().__init__()
        adapters = [adapter] if isinstance(adapter, T2IAdapter) else list(adapter)
        n = len(unet.config.block_out_channels)
        for each in adapters:
            if len(each.adapter.body) != n:
                raise ValueError(
                    f"the adapter gives {len(each.adapter.body)} feature maps; this U-Net has "
                    f"{n} down blocks"
                )
        self.unet = lock(unet)
        self.adapters = nn.ModuleList(adapters)

    def features(
        self, condition: torch.Tensor | Sequence[torch.Tensor], scale: float | Sequence[float] = 1.0
    ) -> list[torch.Tensor]:
        r""":math:`\sum_k \omega_k F_{AD,k}(c_k)`: one feature map per down block, from the
        conditions in [0, 1] (N, 3, H, W), one per adapter (with one adapter, a tensor and a
        number). They depend on neither the timestep nor the prompt, so a sampler computes them
        once."""
        conditions = [condition] if isinstance(condition, torch.Tensor) else list(condition)
        scales = [scale] * len(self.adapters) if isinstance(scale, (int, float)) else list(scale)
        if not len(conditions) == len(scales) == len(self.adapters):
            raise ValueError(
                f"conditions, scales: {len(conditions)} and {len(scales)} given; expected one "
                f"of each per adapter ({len(self.adapters)})"
            )
        summed = None
        for adapter, c, w in zip(self.adapters, conditions, scales, strict=True):
            maps = [f * w for f in adapter(c)]
            summed = maps if summed is None else [a + b for a, b in zip(summed, maps, strict=True)]
        return summed

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditions: torch.Tensor | Sequence[torch.Tensor],
        scales: float | Sequence[float] = 1.0,
    ) -> torch.Tensor:
        """The adapted U-Net's noise prediction (the same arguments as
        :class:`~cnet.ControlledUNet`'s call: a condition and a weight per adapter)."""
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            # the U-Net takes them off the list as it goes: a list of its own
            down_intrablock_additional_residuals=self.features(conditions, scales),
        ).sample
