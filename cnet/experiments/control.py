r"""Control on a trained ControlNet, measured (notebook 06): how strongly, and when.

* **Strength**: every residual times one conditioning scale :math:`s` (the scales of ICCV §3.2,
  diffusers' ``controlnet_conditioning_scale``); fidelity against :math:`s`, from the base alone
  at :math:`s = 0` (Eq. 4's situation: zero residuals) upwards.
* **Timing**: control only within a window of the sampling steps (diffusers'
  ``control_guidance_start`` / ``control_guidance_end``), and the 13 residuals' magnitudes at
  every step of sampling.
* **Without a prompt**: the empty prompt with classifier-free guidance, control on both halves
  of the guidance batch (plain), or on the conditional half only with guess mode's ramp
  (the released demos) or the paper's CFG resolution weighting (ICCV §3.4); measured by the
  colour-blind layout IoU, since no colour is asked for.
* **Composition**: two ControlNets at once, their residuals added
  (:mod:`cnet.experiments.composition`).
* **Transfer**: the ControlNet attached unchanged to a fine-tune of its base (the paper's claim
  for community models), and moved onto it by the released code's rule
  (:meth:`cnet.ControlNet.transferred`).

Every number is the one fidelity definition (:func:`cnet.train.fidelity`) on a fixed evaluation
set with fixed seeds; ``python -m cnet control`` recomputes them into a JSON beside the figures
(drawn by :mod:`cnet.course.control`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..controlnet import ControlNet
from ..injection import ControlledUNet
from ..sample import sample
from ..settings import SettingError
from ..train import cache_data, load_base, load_controlnet
from ..train.data import CachedData
from ..train.evaluation import FULL_SAMPLER, evaluate, sampler_settings
from ..world.finetune import style_of
from .composition import CompositionData, composition_scenes, composition_sweep

__all__ = [
    "PROMPT_FREE_MODES",
    "STRENGTHS",
    "WINDOWS",
    "control_measurements",
    "control_numbers",
    "measure_control",
    "prompt_free_sweep",
    "residual_magnitudes",
    "strength_sweep",
    "transfer_sweep",
    "window_sweep",
]

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
#: (start, end) as fractions of the sampling steps: all, the first quarter / half, the last
#: three quarters / half / quarter.
WINDOWS = ((0.0, 1.0), (0.0, 0.25), (0.0, 0.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0))


def strength_sweep(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet,
    data: CachedData,
    strengths: Sequence[float] = STRENGTHS,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
) -> tuple[list[dict], torch.Tensor]:
    """Fidelity at each conditioning scale, same conditions and seeds; images (S, N, 3, H, W)."""
    rows, images = [], []
    for strength in strengths:
        metrics, drawn = evaluate(pipe, controlled, data, steps, guidance, scales=strength)
        rows.append({"scale": strength, **metrics})
        images.append(drawn)
    return rows, torch.stack(images)


def window_sweep(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet,
    data: CachedData,
    windows: Sequence[tuple[float, float]] = WINDOWS,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
) -> tuple[list[dict], torch.Tensor]:
    """Fidelity with control only in each (start, end) window; the images (W, N, 3, H, W)."""
    rows, images = [], []
    for start, end in windows:
        metrics, drawn = evaluate(
            pipe,
            controlled,
            data,
            steps,
            guidance,
            control_guidance_start=start,
            control_guidance_end=end,
        )
        rows.append({"start": start, "end": end, **metrics})
        images.append(drawn)
    return rows, torch.stack(images)


#: How control is applied when the prompt is empty: name -> keyword arguments of
#: :func:`cnet.sample`.
PROMPT_FREE_MODES = {
    "plain": {},
    "guess mode (released ramp)": {"guess_mode": True, "guess_rule": "released"},
    "CFG-RW (paper)": {"guess_mode": True, "guess_rule": "cfg_rw"},
}


def prompt_free_sweep(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet,
    data: CachedData,
    guidances: Sequence[float] = (3.0, 7.5),
    steps: int = FULL_SAMPLER["steps"],
) -> tuple[list[dict], torch.Tensor]:
    """Layout IoU with the empty prompt: the base alone (at the first guidance), then each of
    :data:`PROMPT_FREE_MODES` at each guidance scale; the images (rows, N, 3, H, W)."""
    metrics, drawn = evaluate(pipe, None, data, steps, guidances[0], prompt_free=True)
    rows, images = [{"mode": "base alone", "guidance": guidances[0], **metrics}], [drawn]
    for mode, control in PROMPT_FREE_MODES.items():
        for guidance in guidances:
            metrics, drawn = evaluate(
                pipe, controlled, data, steps, guidance, prompt_free=True, **control
            )
            rows.append({"mode": mode, "guidance": guidance, **metrics})
            images.append(drawn)
    return rows, torch.stack(images)


def transfer_sweep(
    base: StableDiffusionPipeline,
    fine_tune: StableDiffusionPipeline,
    controlnet: ControlNet,
    data: CachedData,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
) -> tuple[list[dict], torch.Tensor]:
    """On ``fine_tune`` (``data`` rendered in its style): the fine-tune alone, ``controlnet``
    attached unchanged, and ``controlnet`` moved by :meth:`cnet.ControlNet.transferred`; the
    images (3, N, 3, H, W)."""
    device = fine_tune.unet.device
    variants = {
        "fine-tune alone": None,
        "ControlNet unchanged": ControlledUNet(fine_tune.unet, controlnet.to(device)).eval(),
        "ControlNet transferred": ControlledUNet(
            fine_tune.unet, controlnet.transferred(base.unet, fine_tune.unet).to(device)
        ).eval(),
    }
    rows, images = [], []
    for name, controlled in variants.items():
        metrics, drawn = evaluate(fine_tune, controlled, data, steps, guidance)
        rows.append({"model": name, **metrics})
        images.append(drawn)
    return rows, torch.stack(images)


@torch.no_grad()
def residual_magnitudes(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet,
    data: CachedData,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 1234,
) -> torch.Tensor:
    """(13, steps): the root mean square of each residual at each sampling step, over the
    evaluation set (both halves of classifier-free guidance)."""
    rms: dict[int, list[float]] = {}

    def record(step: int, residuals) -> None:
        rms[step] = [float(r.float().pow(2).mean().sqrt()) for r in residuals.tensors()]

    sample(
        pipe,
        controlled,
        data.extras["prompt"],
        data.condition,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator(pipe.unet.device).manual_seed(seed),
        on_residuals=record,
    )
    return torch.tensor([rms[i] for i in range(steps)]).T


def control_numbers(
    base_alone: dict,
    strength: list[dict],
    window: list[dict],
    magnitudes: torch.Tensor,
    prompt_free: list[dict],
    composition: list[dict],
    transfer: list[dict],
    fine_tune: str,
    steps: int,
    guidance: float,
) -> dict:
    """The numbers behind notebook 06's figures, as ``figures/06_control.json`` holds them."""
    return {
        "conditions": base_alone["n"],
        "sampler": f"DDIM, {steps} steps, guidance {guidance}, seed 1234",
        "base_alone": base_alone,
        "strength": strength,
        "window": window,
        "residual_rms": magnitudes.tolist(),
        "prompt_free": prompt_free,
        "composition": composition,
        "transfer": {"fine_tune": fine_tune, "rows": transfer},
    }


def measure_control(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet,
    data: CachedData,
    segmentation: ControlNet,
    scenes: CompositionData,
    fine_tune: StableDiffusionPipeline,
    fine_tune_data: CachedData,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    fine_tune_label: str = "miniature-sd-cycled",
) -> tuple[dict, dict]:
    """Everything notebook 06 measures, section by section as the notebook does it: the numbers
    (:func:`control_numbers`) and the images each sweep drew, with the conditions they were
    drawn under (``"conditions"``, ``"scenes"``), as :func:`cnet.course.control.control_figures`
    takes them. ``segmentation`` is the second ControlNet composed with the first on the
    two-object ``scenes``; ``fine_tune`` is a fine-tune of ``pipe`` and ``fine_tune_data`` the
    same conditions in its style. ``steps`` and ``guidance``: the sampler (notebook 06 and the
    command's default pass the quick profile's, :func:`cnet.train.sampler_settings`)."""
    base_alone, _ = evaluate(pipe, None, data, steps, guidance)
    strength, strength_images = strength_sweep(pipe, controlled, data, STRENGTHS, steps, guidance)
    window, window_images = window_sweep(pipe, controlled, data, WINDOWS, steps, guidance)
    magnitudes = residual_magnitudes(pipe, controlled, data, steps, guidance)
    prompt_free, prompt_free_images = prompt_free_sweep(pipe, controlled, data, steps=steps)
    composition, composition_images = composition_sweep(
        pipe, controlled.controlnets[0], segmentation, scenes, steps, guidance
    )
    transfer, transfer_images = transfer_sweep(
        pipe, fine_tune, controlled.controlnets[0], fine_tune_data, steps, guidance
    )
    numbers = control_numbers(
        base_alone,
        strength,
        window,
        magnitudes,
        prompt_free,
        composition,
        transfer,
        fine_tune_label,
        steps,
        guidance,
    )
    images = {
        "strength": strength_images,
        "window": window_images,
        "prompt_free": prompt_free_images,
        "composition": composition_images,
        "transfer": transfer_images,
        "conditions": data.condition,
        "regions": data.extras["region"],
        "scenes": scenes,
    }
    return numbers, images


def control_measurements(
    folder: str, base: str, fine_tune: str, segmentation: str, samples: int, profile: str = "quick"
) -> tuple[dict, dict]:
    """``python -m cnet control``: every measurement of notebook 06 for the ControlNet in
    ``folder`` on ``base`` (composed with the ``segmentation`` ControlNet, transferred to the
    ``fine_tune`` of the base), on ``samples`` evaluation conditions with ``profile``'s sampler.
    Returns :func:`measure_control`'s numbers and images."""
    controlnet = load_controlnet(folder)  # FileNotFoundError, one line, for a wrong folder
    torch.manual_seed(0)
    pipe = load_base(base)
    if not (Path(fine_tune) / "model_index.json").exists():
        raise FileNotFoundError(
            f"--fine_tune: no diffusers pipeline folder at {fine_tune}; "
            "make one with `python -m cnet.world finetune`"
        )
    tuned = load_base(fine_tune)
    public = [
        {k: v for k, v in m.config.items() if not k.startswith("_")}
        for m in (pipe.unet, tuned.unet)
    ]
    if public[0] != public[1]:
        raise SettingError(
            f"fine_tune: {fine_tune} is not allowed; expected a fine-tune of "
            f"{base} (its U-Net has another configuration)"
        )
    controlled = ControlledUNet(pipe.unet, controlnet).eval()
    data = cache_data(pipe, "fill", samples, "eval", seed=0)
    tuned_data = cache_data(tuned, "fill", samples, "eval", seed=0, style=style_of(fine_tune))
    return measure_control(
        pipe,
        controlled,
        data,
        load_controlnet(segmentation),
        composition_scenes(samples, seed=0),
        tuned,
        tuned_data,
        **sampler_settings(profile),
        fine_tune_label=Path(fine_tune).name,
    )
