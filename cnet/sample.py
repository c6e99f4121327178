r"""Sampling with control: the denoising loop of diffusers' ``StableDiffusionControlNetPipeline``
over a :class:`~cnet.ControlledUNet`.

It is the pipeline's own loop, step for step (``scheduler.scale_model_input``, ControlNet,
U-Net with the residuals injected, classifier-free guidance, ``scheduler.step``), written out
so that it runs any cnet ControlNet, including the paper's condition encoder and several
ControlNets with per-residual scales, which diffusers' ``ControlNetModel`` cannot express.
``tests/test_sample.py`` checks it against the diffusers pipeline's output.

Guess mode with classifier-free guidance follows the released code and diffusers: the
unconditional half of the batch gets no control at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from .injection import ControlledUNet

__all__ = ["sample"]


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet | None,
    prompts: Sequence[str],
    conditions: torch.Tensor | Sequence[torch.Tensor] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    scales: float | Sequence = 1.0,
    guess_mode: bool = False,
    guess_rule: str = "released",
    negative_prompt: str = "",
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    scheduler: DDIMScheduler | None = None,
) -> torch.Tensor:
    """Generate images for ``prompts`` (one each), controlled by ``conditions`` in [0, 1] (one
    tensor (N, 3, H, W), or one per ControlNet). ``controlled=None`` samples the plain base.
    Returns images (N, 3, H, W) in [-1, 1]. The scheduler defaults to DDIM with the pipeline's
    configuration; ``latents`` or ``generator`` fix the starting noise. ``guess_rule`` picks
    guess mode's scale ramp (:func:`cnet.guess_mode_scales`: the released code's or diffusers')."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    n = len(prompts)
    cfg = guidance_scale > 1.0
    cond_embeds, uncond_embeds = pipe.encode_prompt(
        list(prompts), device, 1, cfg, negative_prompt=[negative_prompt] * n
    )
    embeds = torch.cat([uncond_embeds, cond_embeds]) if cfg else cond_embeds
    scheduler = scheduler or DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    size = pipe.unet.config.sample_size
    shape = (n, pipe.unet.config.in_channels, size, size)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    latents = latents.to(device, dtype) * scheduler.init_noise_sigma

    if controlled is not None:
        conds = [conditions] if isinstance(conditions, torch.Tensor) else list(conditions)
        conds = [c.to(device, dtype) for c in conds]
        if cfg:
            conds = [torch.cat([c, c]) for c in conds]
        mask = None
        if guess_mode and cfg:  # control on the conditional half only
            mask = torch.arange(2 * n, device=device) >= n

    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        if controlled is None:
            eps = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        else:
            eps = controlled(x, t, embeds, conds, scales, guess_mode=guess_mode,
                             guess_rule=guess_rule, control_mask=mask)
        if cfg:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample

    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return images.clamp(-1, 1)
