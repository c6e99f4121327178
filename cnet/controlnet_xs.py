r"""ControlNet-XS on the locked U-Net: a small control network that talks to the base at every
block, in both directions (Zavadski, Feiden & Rother, "ControlNet-XS: Rethinking the Control of
Text-to-Image Diffusion Models as Feedback-Control Systems", ECCV 2024, arXiv:2312.06573).

ControlNet's copy reads the noisy latent and the condition but never the base's features, and it
is as large as the base's encoder (Eq. 2). ControlNet-XS makes the control network much
narrower (``size_ratio`` of the base's channels) and connects it to the base block by block:
before each of its blocks it concatenates the base's features of that level (base → control),
and after each block it adds its output to the base's through a zero-initialised convolution
(control → base, the role of ControlNet's zero convolutions), in the encoder, the middle block
and the decoder's skip connections. For block :math:`i`, with :math:`x_i` the base's features
and :math:`y_i` the control's:

.. math:: y_{i+1} = \mathcal F_c([y_i, x_i]; \Theta_c), \qquad
          x_{i+1} = \mathcal F(x_i; \Theta) + s\, \mathcal Z(y_{i+1}; \Theta_z),

with :math:`\Theta` locked, :math:`\mathcal Z` zero at initialisation (so the base is kept
exactly, as Eq. 4 keeps it) and :math:`s` the conditioning scale.

diffusers implements both parts: ``ControlNetXSAdapter`` (the control network alone, what is
trained and saved) and ``UNetControlNetXSModel`` (base and control fused into one U-Net, whose
``from_unet`` copies the weights of both). :class:`ControlNetXSUNet` builds the fused model and
then hands it the adapter's own modules in place of its copies, so that the adapter being
trained *is* the fused model's control half and saves as itself. Its pipeline
(``StableDiffusionControlNetXSPipeline``) is deprecated in diffusers (it lives in
``diffusers.pipelines.deprecated``); :func:`cnet.sample` samples the fused model with the same
loop, and ``tests/core/test_controlnet_xs.py`` checks the images against that pipeline's.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetXSAdapter, UNet2DConditionModel, UNetControlNetXSModel
from diffusers.utils import logging as diffusers_logging
from torch import nn

from .block import lock

__all__ = ["ControlNetXSUNet", "controlnet_xs_for"]

#: The control network's width as a share of the base's (diffusers' ``size_ratio``); the paper's
#: smallest SD models use about a tenth, which leaves the miniature's narrowest block fewer
#: channels than its group norm needs: a quarter is the smallest that builds here.
SIZE_RATIO = 0.25


def controlnet_xs_for(unet: UNet2DConditionModel, size_ratio: float = SIZE_RATIO):
    """diffusers' ``ControlNetXSAdapter`` for ``unet`` at ``size_ratio`` of its channels, its
    random weights drawn from torch's generator (the control → base convolutions at zero)."""
    with _quiet():
        return ControlNetXSAdapter.from_unet(unet, size_ratio=size_ratio)


class ControlNetXSUNet(nn.Module):
    """The locked U-Net with a ControlNet-XS: diffusers' ``UNetControlNetXSModel`` built from
    ``unet`` and ``adapter``, its base half locked (:func:`cnet.lock`), its control half the
    adapter's own modules (trained in place; the fused model holds no copy of them)."""

    def __init__(self, unet: UNet2DConditionModel, adapter: ControlNetXSAdapter):
        super().__init__()
        with _quiet():
            fused = UNetControlNetXSModel.from_unet(unet, adapter).to(unet.device)
        share_control_modules(fused, adapter)
        match_base_norms(fused, unet)
        for name, part in fused.named_children():  # the base's parts (the blocks mix both)
            if name.startswith("base_"):
                lock(part)
        self.fused, self.adapter = fused, adapter

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditions: torch.Tensor,
        scales: float = 1.0,
        apply_control: bool = True,
    ) -> torch.Tensor:
        """The controlled U-Net's noise prediction (the same arguments as
        :class:`~cnet.ControlledUNet`'s call; ``scales``: diffusers' ``conditioning_scale``;
        ``apply_control`` False: the fused U-Net's base half alone, as diffusers' pipeline runs
        it outside the control window)."""
        return self.fused(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=conditions,
            conditioning_scale=scales,
            apply_control=apply_control,
        ).sample


def share_control_modules(fused: UNetControlNetXSModel, adapter: ControlNetXSAdapter) -> None:
    """Put ``adapter``'s modules into ``fused`` in place of the copies ``from_unet`` made of
    them (the mapping is the reverse of diffusers' ``from_unet`` / ``from_modules``); the base's
    half frozen (diffusers' ``freeze_unet_params``)."""
    fused.freeze_unet_params()
    base = {id(p) for p in fused.parameters() if not p.requires_grad}
    fused.controlnet_cond_embedding = adapter.controlnet_cond_embedding
    fused.ctrl_conv_in = adapter.conv_in
    fused.control_to_base_for_conv_in = adapter.control_to_base_for_conv_in
    if adapter.time_embedding is not None:
        fused.ctrl_time_embedding = adapter.time_embedding
    for block, own in zip(fused.down_blocks, adapter.down_blocks):
        block.ctrl_resnets = own.resnets
        if own.attentions is not None:  # (a block without cross-attention has none)
            block.ctrl_attentions = own.attentions
        if own.downsamplers is not None:  # (the last block has none)
            block.ctrl_downsamplers = own.downsamplers
        block.base_to_ctrl, block.ctrl_to_base = own.base_to_ctrl, own.ctrl_to_base
    middle, own = fused.mid_block, adapter.mid_block
    middle.base_to_ctrl, middle.ctrl_midblock = own.base_to_ctrl, own.midblock
    middle.ctrl_to_base = own.ctrl_to_base
    for block, own in zip(fused.up_blocks, adapter.up_connections):
        block.ctrl_to_base = own.ctrl_to_base
    control = {id(p) for p in fused.parameters()} - base
    if control != {id(p) for p in adapter.parameters()}:  # diffusers changed its layout
        raise RuntimeError("the fused ControlNet-XS U-Net's control half is not the adapter's")


def match_base_norms(fused: UNetControlNetXSModel, unet: UNet2DConditionModel) -> None:
    """Give the fused U-Net's base half the normalisation epsilons of ``unet``'s layers.
    diffusers' fused model builds its base's ResNet blocks with GroupNorm's eps at 1e-6 whatever
    the U-Net's ``norm_eps`` (SD1.5's: 1e-5), so without this its base half computes another
    function than the base, by about 1e-5 on the miniature, at initialisation and at scale 0;
    with it, the two agree (``tests/core/test_controlnet_xs.py``)."""
    pairs = [(unet.conv_norm_out, fused.base_conv_norm_out)]
    for own, block in zip(unet.down_blocks, fused.down_blocks):
        pairs.append((own.resnets, block.base_resnets))
        if hasattr(own, "attentions"):
            pairs.append((own.attentions, block.base_attentions))
    pairs.append((unet.mid_block, fused.mid_block.base_midblock))
    for own, block in zip(unet.up_blocks, fused.up_blocks):
        pairs.append((own.resnets, block.resnets))
        if hasattr(own, "attentions"):
            pairs.append((own.attentions, block.attentions))
    for own, theirs in pairs:
        norms = [m for m in own.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
        fused_norms = [m for m in theirs.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
        if len(norms) != len(fused_norms):  # diffusers changed its layout
            raise RuntimeError("the fused ControlNet-XS U-Net's base half is not the U-Net's")
        for mine, fused_norm in zip(norms, fused_norms):
            fused_norm.eps = mine.eps


class _quiet:
    """diffusers' warnings off while it builds the models (each ``.to()`` of a freshly built
    model announces that it keeps no module in float32)."""

    def __enter__(self):
        self.level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()

    def __exit__(self, *exc):
        diffusers_logging.set_verbosity(self.level)
