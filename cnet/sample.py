r"""Sampling with control: the denoising loop of diffusers' ``StableDiffusionControlNetPipeline``
over a :class:`~cnet.ControlledUNet`.

It is the pipeline's own loop, step for step (``scheduler.scale_model_input``, ControlNet,
U-Net with the residuals injected, classifier-free guidance, ``scheduler.step``), written out
so that it runs any cnet ControlNet, including the paper's condition encoder and several
ControlNets with per-residual scales, which diffusers' ``ControlNetModel`` cannot express. One
difference: each condition is encoded once (:meth:`cnet.ControlNet.encode_condition`; the same
residuals, bit for bit), not at every step, which halves a step's work on the miniature's CPU.
``tests/core/test_sample.py`` checks it against the diffusers pipeline's output.

A T2I-Adapter (:class:`~cnet.AdaptedUNet`) is sampled as diffusers'
``StableDiffusionAdapterPipeline`` samples it: its features computed once, times ``scales`` (one
number: the pipeline's ``adapter_conditioning_scale``), given to both halves of a guided batch,
and added inside the U-Net's down blocks at every step. Guess mode and the control window are
ControlNet's and are refused for it. A ControlNet-XS (:class:`~cnet.ControlNetXSUNet`) is
sampled as diffusers' (deprecated) ``StableDiffusionControlNetXSPipeline`` samples it: its fused
U-Net at every step, the condition in both halves, ``scales`` its one conditioning scale, and
the control window by the same rule (``apply_control`` off outside it); a channel-concatenation
U-Net (:class:`~cnet.ConcatenatedUNet`) as ``StableDiffusionInstructPix2PixPipeline`` samples it
with an image guidance of 1: the condition's latent, encoded once, beside the noisy latent in
both halves. Neither has guess mode; the concatenation has no weight and no window.

Guess mode with classifier-free guidance follows the released code and diffusers: the
unconditional half of the batch gets no control at all.

Timing: ``control_guidance_start`` / ``control_guidance_end`` (fractions of the sampling steps,
diffusers' names and rule) switch control off outside a window: step :math:`i` of :math:`T` is
controlled unless :math:`i/T < \text{start}` or :math:`(i+1)/T > \text{end}`. ``on_residuals``
sees the residuals of every step (after scaling), e.g. to record their magnitudes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from .adapter import AdaptedUNet
from .concat import ConcatenatedUNet
from .controlnet_xs import ControlNetXSUNet
from .injection import ControlledUNet, inject_residuals
from .residuals import ControlResiduals

__all__ = ["controlled_steps", "sample"]


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet | AdaptedUNet | ControlNetXSUNet | ConcatenatedUNet | None,
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
    control_guidance_start: float = 0.0,
    control_guidance_end: float = 1.0,
    on_residuals: Callable[[int, ControlResiduals], None] | None = None,
) -> torch.Tensor:
    """Generate images for ``prompts`` (one each), controlled by ``conditions`` in [0, 1] (one
    tensor (N, 3, H, W), or one per ControlNet). ``controlled=None`` samples the plain base.
    Returns images (N, 3, H, W) in [-1, 1]. The scheduler defaults to DDIM with the pipeline's
    configuration; ``latents`` or ``generator`` fix the starting noise. ``guess_rule`` picks
    guess mode's scale ramp (:func:`cnet.guess_mode_scales`: the released code's or diffusers').
    The control window and ``on_residuals`` are described in the module docstring."""
    _check_window(control_guidance_start, control_guidance_end)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    n = len(prompts)
    cfg = guidance_scale > 1.0
    cond_embeds, uncond_embeds = pipe.encode_prompt(
        list(prompts), device, 1, cfg, negative_prompt=[negative_prompt] * n
    )
    embeds = torch.cat([uncond_embeds, cond_embeds]) if cfg else cond_embeds
    scheduler = scheduler or DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = _initial_latents(pipe, n, scheduler, generator, latents)

    inside = controlled_steps(
        len(scheduler.timesteps), control_guidance_start, control_guidance_end
    )
    successor = isinstance(controlled, (AdaptedUNet, ControlNetXSUNet, ConcatenatedUNet))
    if successor:
        window = (control_guidance_start, control_guidance_end)
        predict = _successor_prediction(
            pipe, controlled, conditions, scales, guess_mode, window, cfg, inside
        )
    elif controlled is not None:
        conds, mask = _control_inputs(controlled, conditions, n, cfg, guess_mode, device, dtype)

    for i, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents] * 2) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        if controlled is None:
            eps = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        elif successor:
            eps = predict(i, x, t, embeds)
        else:
            outside = i not in inside
            residuals = controlled.residuals(
                x,
                t,
                embeds,
                conds,
                _times(scales, 0.0 if outside else 1.0),
                guess_mode,
                guess_rule,
                mask,
            )
            if on_residuals is not None:
                on_residuals(i, residuals)
            eps = inject_residuals(pipe.unet, x, t, embeds, residuals)
        if cfg:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample

    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return images.clamp(-1, 1)


def _times(scales, factor: float):
    """Scales (one number, one per residual, or one of either per ControlNet) times ``factor``,
    as diffusers multiplies its conditioning scale by the window's keep factor."""
    if isinstance(scales, (int, float)):
        return scales * factor
    return [_times(s, factor) for s in scales]


def _control_inputs(
    controlled: ControlledUNet, conditions, n: int, cfg: bool, guess_mode: bool, device, dtype
):
    """The conditions as the batch needs them (doubled for classifier-free guidance), encoded,
    and which samples get control (guess mode with guidance: the conditional half only)."""
    conds = [conditions] if isinstance(conditions, torch.Tensor) else list(conditions)
    conds = [c.to(device, dtype) for c in conds]
    if cfg:
        conds = [torch.cat([c, c]) for c in conds]
    if len(conds) == len(controlled.controlnets):  # (otherwise refused by .residuals)
        # E(c) is the same at every step: encoded once, not at every step as diffusers does
        conds = [net.encode_condition(c) for net, c in zip(controlled.controlnets, conds)]
    mask = torch.arange(2 * n, device=device) >= n if guess_mode and cfg else None
    return conds, mask


def controlled_steps(steps: int, start: float, end: float) -> list[int]:
    """The sampling steps (0-based, of ``steps``) that a control window ``[start, end]`` acts
    on, by diffusers' rule: step i when ``start <= i / steps`` and ``(i + 1) / steps <= end``."""
    return [i for i in range(steps) if start <= i / steps and (i + 1) / steps <= end]


def _check_window(start: float, end: float) -> None:
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"control_guidance_start, control_guidance_end: {start!r}, {end!r} are "
            "not allowed; expected 0 <= start < end <= 1"
        )


def _successor_prediction(pipe, controlled, conditions, scales, guess_mode, window, cfg, inside):
    """The noise prediction at step ``i`` of a method that followed ControlNet, as its diffusers
    pipeline makes it (module docstring); what does not change from step to step (an adapter's
    features, a condition's latent) computed once."""
    _check_single_weight_call(controlled, scales, guess_mode, window)
    if isinstance(controlled, AdaptedUNet):  # a condition per adapter
        given = [c.to(pipe.unet.device, pipe.unet.dtype) for c in _as_list(conditions)]
        features = _adapter_features(controlled, given, scales, cfg)
        # the U-Net takes the maps off the list it is given: a list each step
        return lambda i, x, t, embeds: (
            pipe.unet(
                x,
                t,
                encoder_hidden_states=embeds,
                down_intrablock_additional_residuals=list(features),
            ).sample
        )
    given = conditions.to(pipe.unet.device, pipe.unet.dtype)
    if isinstance(controlled, ConcatenatedUNet):
        given = controlled.condition_latents(given)
    given = torch.cat([given, given]) if cfg else given  # the condition in both halves
    if isinstance(controlled, ConcatenatedUNet):
        return lambda i, x, t, embeds: controlled.predict(x, t, embeds, given)
    return lambda i, x, t, embeds: controlled(
        x, t, embeds, given, scales, apply_control=i in inside
    )


def _as_list(conditions) -> list:
    return [conditions] if isinstance(conditions, torch.Tensor) else list(conditions)


def _adapter_features(adapted: AdaptedUNet, conditions, scale: float, cfg: bool):
    """The adapter's features, computed once for every step, for both halves of a guided batch
    (diffusers' adapter pipeline gives the unconditional half the condition too)."""
    return [torch.cat([f, f]) if cfg else f for f in adapted.features(conditions, scale)]


_NAMES = {AdaptedUNet: "a T2I-Adapter", ControlNetXSUNet: "a ControlNet-XS"}


def _check_single_weight_call(controlled, scales, guess_mode: bool, window) -> None:
    """The methods after ControlNet take one condition weight (the concatenation none), no
    guess mode, and (but ControlNet-XS) no control window, as their diffusers pipelines."""
    kind = _NAMES.get(type(controlled), "a channel-concatenation U-Net")
    weights = (1.0,) if isinstance(controlled, ConcatenatedUNet) else None
    several = isinstance(controlled, AdaptedUNet) and len(controlled.adapters) > 1
    number = isinstance(scales, (int, float))
    if several and not number:  # one weight per adapter (diffusers' MultiAdapter's weights)
        number = len(scales) == len(controlled.adapters) and all(
            isinstance(s, (int, float)) for s in scales
        )
    if not number or (weights and scales not in weights):
        expected = "1 (it has no condition weight)" if weights else "one number (its weight)"
        expected += f", or one per adapter ({len(controlled.adapters)})" if several else ""
        raise ValueError(f"scales: {scales!r} is not allowed for {kind}; expected {expected}")
    windowed = isinstance(controlled, ControlNetXSUNet)
    if guess_mode or (not windowed and tuple(window) != (0.0, 1.0)):
        names = "guess_mode" + (
            "" if windowed else ", control_guidance_start, control_guidance_end"
        )
        expected = "False" + ("" if windowed else ", 0 and 1")
        raise ValueError(
            f"{names}: not allowed for {kind}; expected {expected} (its diffusers pipeline has "
            "no such setting)"
        )


def _initial_latents(pipe, n: int, scheduler, generator, latents):
    """The starting noise: ``latents`` if given, else drawn from ``generator``, scaled as the
    scheduler expects."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    size = pipe.unet.config.sample_size
    if latents is None:
        latents = randn_tensor(
            (n, pipe.unet.config.in_channels, size, size),
            generator=generator,
            device=device,
            dtype=dtype,
        )
    return latents.to(device, dtype) * scheduler.init_noise_sigma
