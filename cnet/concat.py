r"""Channel concatenation: the whole U-Net fine-tuned with the condition's latent as extra input
channels, the design of InstructPix2Pix (Brooks, Holynski & Efros, "InstructPix2Pix: Learning to
Follow Image Editing Instructions", CVPR 2023, §3.2) and of FLUX.1's Control models
(black-forest-labs' model cards for FLUX.1 Canny / Depth [dev]). It is the baseline ControlNet
argues against (ICCV §1): no copy, no locked base, every weight trained.

The condition image :math:`c` is encoded by the locked VAE,
:math:`z_c = \mathcal E_{\text{VAE}}(c)` (its mode, unscaled, as diffusers' InstructPix2Pix
pipeline and training script encode it; not Eq. 9's condition encoder), and
concatenated to the noisy latent along the channels; the U-Net's first convolution gets as
many new input channels, initialised to zero (InstructPix2Pix §3.2), so that before any update

.. math:: \epsilon_\theta([z_t, z_c], t, c_t) = \epsilon_\Theta(z_t, t, c_t)

as Eq. 4 keeps the base for a ControlNet. After training nothing keeps it: there is no scale
that gives the base back.

diffusers' ``StableDiffusionInstructPix2PixPipeline`` samples such a U-Net; with
``image_guidance_scale`` 1 its guidance is the text guidance :func:`cnet.sample` applies
(the condition in both halves), and ``tests/core/test_concat.py`` checks the images.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .block import lock

__all__ = ["ConcatenatedUNet", "concat_unet_for"]


def concat_unet_for(unet: UNet2DConditionModel, condition_channels: int | None = None):
    """A trainable copy of the whole ``unet`` whose ``conv_in`` takes ``condition_channels``
    more input channels (default: as many as the latent has), their weights zero: the copy
    predicts what ``unet`` does whatever the extra channels hold."""
    extra = condition_channels or unet.config.in_channels
    copy = UNet2DConditionModel.from_config(
        {**unet.config, "in_channels": unet.config.in_channels + extra}
    )
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat(
        [weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1
    )
    copy.load_state_dict(state)
    copy.to(unet.device)
    if copy.dtype != unet.dtype:  # (only then: diffusers warns at every cast of a dtype)
        copy.to(dtype=unet.dtype)
    return copy.requires_grad_(True)


class ConcatenatedUNet(nn.Module):
    """A U-Net with the condition's latent concatenated to its input: ``unet`` is the
    concatenating U-Net (:func:`concat_unet_for`, trained whole), ``vae`` the base's, locked
    in place (:func:`cnet.lock`), which encodes the condition."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL):
        super().__init__()
        self.unet, self.vae = unet, lock(vae)

    @torch.no_grad()
    def condition_latents(self, condition: torch.Tensor) -> torch.Tensor:
        r""":math:`z_c = \mathcal E_{\text{VAE}}(c)`: the VAE's mode for the condition in [0, 1]
        (N, 3, H, W), unscaled, as InstructPix2Pix encodes its input image. It does not depend
        on the step, so a sampler computes it once."""
        dtype = self.vae.dtype
        return self.vae.encode(condition.to(dtype) * 2 - 1).latent_dist.mode()

    def predict(self, sample, timestep, encoder_hidden_states, latents) -> torch.Tensor:
        """The noise prediction for ``sample`` with the condition's ``latents`` beside it."""
        x = torch.cat([sample, latents.to(sample.dtype)], dim=1)
        return self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states).sample

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditions: torch.Tensor,
        scales: float = 1.0,
    ) -> torch.Tensor:
        """The noise prediction (the same arguments as :class:`~cnet.ControlledUNet`'s call;
        there is no condition weight, so ``scales`` must be 1)."""
        if scales != 1.0:
            raise ValueError(
                f"scales: {scales!r} is not allowed for a channel-concatenation U-Net; "
                "expected 1 (it has no condition weight)"
            )
        return self.predict(
            sample, timestep, encoder_hidden_states, self.condition_latents(conditions)
        )
