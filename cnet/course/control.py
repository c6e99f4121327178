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
* **Composition**: two ControlNets at once, their residuals added (:mod:`cnet.course.composition`).
* **Transfer**: the ControlNet attached unchanged to a fine-tune of its base (the paper's claim
  for community models), and moved onto it by the released code's rule
  (:meth:`cnet.ControlNet.transferred`).

Every number is the one fidelity definition (:func:`cnet.train.fidelity`) on a fixed evaluation
set with fixed seeds; ``python -m cnet control`` recomputes them into a JSON beside the figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline

from ..controlnet import ControlNet
from ..injection import ControlledUNet
from ..sample import sample
from ..train.data import CachedData
from ..train.evaluate import FULL_SAMPLER, evaluate
from .composition import CompositionData, composition_sweep

__all__ = [
    "control_measurements",
    "PROMPT_FREE_MODES", "STRENGTHS", "WINDOWS", "composition_figures", "control_numbers",
    "measure_control", "plot_residual_heatmap", "plot_sample_strip", "plot_sweep",
    "prompt_free_figures",
    "prompt_free_sweep", "residual_magnitudes", "strength_figures", "strength_sweep",
    "timing_figures", "transfer_figures", "transfer_sweep", "window_sweep",
]

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
#: (start, end) as fractions of the sampling steps: all, the first quarter / half, the last
#: three quarters / half / quarter.
WINDOWS = ((0.0, 1.0), (0.0, 0.25), (0.0, 0.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0))


def strength_sweep(pipe: StableDiffusionPipeline, controlled: ControlledUNet, data: CachedData,
                   strengths: Sequence[float] = STRENGTHS, steps: int = FULL_SAMPLER["steps"],
                   guidance: float = FULL_SAMPLER["guidance"]) -> tuple[list[dict], torch.Tensor]:
    """Fidelity at each conditioning scale, same conditions and seeds; images (S, N, 3, H, W)."""
    rows, images = [], []
    for strength in strengths:
        metrics, drawn = evaluate(pipe, controlled, data, steps, guidance, scales=strength)
        rows.append({"scale": strength, **metrics})
        images.append(drawn)
    return rows, torch.stack(images)


def window_sweep(pipe: StableDiffusionPipeline, controlled: ControlledUNet, data: CachedData,
                 windows: Sequence[tuple[float, float]] = WINDOWS,
                 steps: int = FULL_SAMPLER["steps"], guidance: float = FULL_SAMPLER["guidance"],
                 ) -> tuple[list[dict], torch.Tensor]:
    """Fidelity with control only in each (start, end) window; the images (W, N, 3, H, W)."""
    rows, images = [], []
    for start, end in windows:
        metrics, drawn = evaluate(pipe, controlled, data, steps, guidance,
                                  control_guidance_start=start, control_guidance_end=end)
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


def prompt_free_sweep(pipe: StableDiffusionPipeline, controlled: ControlledUNet,
                      data: CachedData, guidances: Sequence[float] = (3.0, 7.5),
                      steps: int = FULL_SAMPLER["steps"]) -> tuple[list[dict], torch.Tensor]:
    """Layout IoU with the empty prompt: the base alone (at the first guidance), then each of
    :data:`PROMPT_FREE_MODES` at each guidance scale; the images (rows, N, 3, H, W)."""
    metrics, drawn = evaluate(pipe, None, data, steps, guidances[0], prompt_free=True)
    rows, images = [{"mode": "base alone", "guidance": guidances[0], **metrics}], [drawn]
    for mode, control in PROMPT_FREE_MODES.items():
        for guidance in guidances:
            metrics, drawn = evaluate(pipe, controlled, data, steps, guidance, prompt_free=True,
                                      **control)
            rows.append({"mode": mode, "guidance": guidance, **metrics})
            images.append(drawn)
    return rows, torch.stack(images)


def transfer_sweep(base: StableDiffusionPipeline, fine_tune: StableDiffusionPipeline,
                   controlnet: ControlNet, data: CachedData, steps: int = FULL_SAMPLER["steps"],
                   guidance: float = FULL_SAMPLER["guidance"]) -> tuple[list[dict], torch.Tensor]:
    """On ``fine_tune`` (``data`` rendered in its style): the fine-tune alone, ``controlnet``
    attached unchanged, and ``controlnet`` moved by :meth:`cnet.ControlNet.transferred`; the
    images (3, N, 3, H, W)."""
    device = fine_tune.unet.device
    variants = {
        "fine-tune alone": None,
        "ControlNet unchanged": ControlledUNet(fine_tune.unet, controlnet.to(device)).eval(),
        "ControlNet transferred": ControlledUNet(
            fine_tune.unet, controlnet.transferred(base.unet, fine_tune.unet).to(device)).eval(),
    }
    rows, images = [], []
    for name, controlled in variants.items():
        metrics, drawn = evaluate(fine_tune, controlled, data, steps, guidance)
        rows.append({"model": name, **metrics})
        images.append(drawn)
    return rows, torch.stack(images)


@torch.no_grad()
def residual_magnitudes(pipe: StableDiffusionPipeline, controlled: ControlledUNet,
                        data: CachedData, steps: int = FULL_SAMPLER["steps"],
                        guidance: float = FULL_SAMPLER["guidance"], seed: int = 1234
                        ) -> torch.Tensor:
    """(13, steps): the root mean square of each residual at each sampling step, over the
    evaluation set (both halves of classifier-free guidance)."""
    rms: dict[int, list[float]] = {}

    def record(step: int, residuals) -> None:
        rms[step] = [float(r.float().pow(2).mean().sqrt()) for r in residuals.tensors()]

    sample(pipe, controlled, data.extras["prompt"], data.condition, num_inference_steps=steps,
           guidance_scale=guidance, generator=torch.Generator(pipe.unet.device).manual_seed(seed),
           on_residuals=record)
    return torch.tensor([rms[i] for i in range(steps)]).T


# ------------------------------------------------------------------------------ figures


def plot_sweep(rows: list[dict], x: Sequence[float], xlabel: str, title: str = "",
               ceiling: float | None = None, base: float | None = None):
    """Fidelity (IoU) and prompt adherence (both colours drawn) against a knob."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(x, [r["iou"] for r in rows], "o-", label="fidelity (IoU with the requested disc)")
    ax.plot(x, [r["colours_ok"] for r in rows], "s--", label="both prompted colours drawn")
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", lw=0.8, ls=":", label=f"VAE ceiling {ceiling:.2f}")
    if base is not None:
        ax.axhline(base, color="tab:red", lw=0.8, ls=":", label=f"base alone {base:.2f}")
    ax.set(xlabel=xlabel, ylim=(0, 1.05), title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_sample_strip(images: torch.Tensor, labels: Sequence[str], conditions: torch.Tensor,
                      title: str = ""):
    """Rows: conditions; columns: the condition, then one image per setting."""
    import matplotlib.pyplot as plt

    settings, n = images.shape[:2]
    fig, axes = plt.subplots(n, settings + 1, figsize=(1.3 * (settings + 1), 1.35 * n + 0.4),
                             squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(conditions[row].permute(1, 2, 0).numpy(), interpolation="nearest")
        for col in range(settings):
            picture = ((images[col, row] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            axes[row, col + 1].imshow(picture, interpolation="nearest")
    for col, label in enumerate(["condition", *labels]):
        axes[0, col].set_title(label, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_residual_heatmap(magnitudes: torch.Tensor, title: str = ""):
    """The 13 residuals' RMS (rows) at each sampling step (columns), one colour scale per row
    relative to its own largest value, so that every residual's timing shows."""
    import matplotlib.pyplot as plt

    relative = magnitudes / magnitudes.amax(dim=1, keepdim=True).clamp(min=1e-12)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    image = ax.imshow(relative.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="sampling step (DDIM, first = noisiest)", ylabel="residual",
           xticks=range(0, magnitudes.shape[1], 2), yticks=range(magnitudes.shape[0]),
           yticklabels=[f"{i}" if i < magnitudes.shape[0] - 1 else f"{i} (middle)"
                        for i in range(magnitudes.shape[0])], title=title)
    ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, label="RMS / its row's largest")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ what ships


def strength_figures(rows: list[dict], images: torch.Tensor, base_iou: float,
                     conditions: torch.Tensor, label: str) -> dict:
    """``06_strength`` (fidelity against the scale) and ``06_strength_samples`` (six conditions
    at scales 0, 0.25, 0.5, 1 and 2) of a :func:`strength_sweep` over :data:`STRENGTHS`."""
    shown = [STRENGTHS.index(s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    title = f"{label}: fidelity against strength ({images.shape[1]} conditions)"
    return {
        "06_strength": plot_sweep(rows, STRENGTHS, "conditioning scale s", base=base_iou,
                                  title=title),
        "06_strength_samples": plot_sample_strip(
            images[shown, :6], [f"s = {STRENGTHS[i]}" for i in shown], conditions[:6],
            title="Same conditions and seeds, scale by scale"),
    }


def timing_figures(rows: list[dict], images: torch.Tensor, base_iou: float,
                   conditions: torch.Tensor, label: str) -> dict:
    """``06_timing`` (fidelity against the window) and ``06_timing_samples`` of a
    :func:`window_sweep` over :data:`WINDOWS`."""
    labels = [f"[{s:.2f}, {e:.2f}]" for s, e in WINDOWS]
    title = f"{label}: fidelity against the control window ({images.shape[1]} conditions)"
    sweep = plot_sweep(rows, range(len(WINDOWS)), "control window (fractions of the sampling "
                       "steps)", base=base_iou, title=title)
    sweep.axes[0].set_xticks(range(len(WINDOWS)), labels, fontsize=7)
    return {"06_timing": sweep,
            "06_timing_samples": plot_sample_strip(images[:, :6], labels, conditions[:6],
                                                   title="Same conditions and seeds, window by "
                                                         "window")}


def prompt_free_figures(rows: list[dict], images: torch.Tensor, prompted_layout_iou: float,
                        conditions: torch.Tensor, label: str) -> dict:
    """``06_prompt_free`` (layout IoU of each way of applying control to the empty prompt, at
    each guidance scale) and ``06_prompt_free_samples`` of a :func:`prompt_free_sweep`."""
    import matplotlib.pyplot as plt

    guidances = sorted({r["guidance"] for r in rows[1:]})
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(guidances)
    for k, guidance in enumerate(guidances):
        chosen = [r for r in rows[1:] if r["guidance"] == guidance]
        bars = ax.bar([m + (k - (len(guidances) - 1) / 2) * width for m in range(len(chosen))],
                      [r["layout_iou"] for r in chosen], width, label=f"guidance {guidance:g}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(rows[0]["layout_iou"], color="tab:red", lw=0.8, ls=":",
               label=f"base alone {rows[0]['layout_iou']:.2f}")
    ax.axhline(prompted_layout_iou, color="gray", lw=0.8, ls="--",
               label=f"with the prompt, scale 1: {prompted_layout_iou:.2f}")
    ax.set_xticks(range(len(PROMPT_FREE_MODES)), list(PROMPT_FREE_MODES), fontsize=8)
    ax.set(ylabel="layout IoU (any colour)", ylim=(0, 1.3), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0],
           title=f"{label} with the empty prompt ({rows[0]['n']} conditions)")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    labels = ["base alone"] + [f"{r['mode'].split(' (')[0]}, g {r['guidance']:g}"
                               for r in rows[1:]]
    return {"06_prompt_free": fig,
            "06_prompt_free_samples": plot_sample_strip(
                images[:, :4], labels, conditions[:4],
                title="The empty prompt: same conditions and seeds, mode by mode")}


def transfer_figures(rows: list[dict], images: torch.Tensor, on_base: dict,
                     on_base_images: torch.Tensor, conditions: torch.Tensor, fine_tune: str
                     ) -> dict:
    """``06_transfer``: the ControlNet on its own base, then the :func:`transfer_sweep` on the
    fine-tune, six conditions, each column titled with its mean IoU."""
    labels = [f"base + ControlNet\nIoU {on_base['iou']:.2f}"] + [
        f"{r['model'].replace('ControlNet ', 'CN ')}\nIoU {r['iou']:.2f}" for r in rows]
    strip = torch.cat([on_base_images[None, :6], images[:, :6]])
    return {"06_transfer": plot_sample_strip(
        strip, labels, conditions[:6],
        title=f"The same prompts on the base and on its fine-tune {fine_tune}")}


def composition_figures(rows: list[dict], images: torch.Tensor, data: CompositionData) -> dict:
    """``06_composition``: six scenes, their two conditions in one picture, then one column per
    row of :func:`composition_sweep`, titled with both objects' mean layout IoU."""
    # the two conditions in one picture: the circle's outline over the shape's class map
    shown = torch.maximum(data.outline[:6], data.segmentation[:6])
    names = [r["composition"].replace(", ", ",\n") for r in rows]
    labels = [f"{name}\ncircle {r['circle_layout_iou']:.2f}, shape {r['shape_layout_iou']:.2f}"
              for name, r in zip(names, rows, strict=True)]
    return {"06_composition": plot_sample_strip(
        images[:, :6], labels, shown,
        title="Two objects, two ControlNets: each object's layout IoU with its region")}


def control_numbers(base_alone: dict, strength: list[dict], window: list[dict],
                    magnitudes: torch.Tensor, prompt_free: list[dict], composition: list[dict],
                    transfer: list[dict], fine_tune: str, steps: int, guidance: float) -> dict:
    """The numbers behind notebook 06's figures, as ``figures/06_control.json`` holds them."""
    return {"conditions": base_alone["n"],
            "sampler": f"DDIM, {steps} steps, guidance {guidance}, seed 1234",
            "base_alone": base_alone, "strength": strength, "window": window,
            "residual_rms": magnitudes.tolist(), "prompt_free": prompt_free,
            "composition": composition, "transfer": {"fine_tune": fine_tune, "rows": transfer}}


def measure_control(pipe: StableDiffusionPipeline, controlled: ControlledUNet, data: CachedData,
                    segmentation: ControlNet, scenes: CompositionData,
                    fine_tune: StableDiffusionPipeline, fine_tune_data: CachedData,
                    steps: int = FULL_SAMPLER["steps"], guidance: float = FULL_SAMPLER["guidance"],
                    label: str = "controlnet-fill", fine_tune_label: str = "miniature-sd-cycled"
                    ) -> tuple[dict, dict]:
    """Everything notebook 06 measures, section by section as the notebook does it: the numbers
    and the figures (name -> figure) that ``python -m cnet control`` writes. ``segmentation``
    is the second ControlNet composed with the first on the two-object ``scenes``;
    ``fine_tune`` is a fine-tune of ``pipe`` and ``fine_tune_data`` the same conditions in its
    style. ``steps`` and ``guidance``: the sampler (notebook 06 and the command's default pass
    the quick profile's, :func:`cnet.train.sampler_settings`)."""
    base_alone, _ = evaluate(pipe, None, data, steps, guidance)
    strength, strength_images = strength_sweep(pipe, controlled, data, STRENGTHS, steps, guidance)
    window, window_images = window_sweep(pipe, controlled, data, WINDOWS, steps, guidance)
    magnitudes = residual_magnitudes(pipe, controlled, data, steps, guidance)
    prompt_free, prompt_free_images = prompt_free_sweep(pipe, controlled, data, steps=steps)
    composition, composition_images = composition_sweep(pipe, controlled.controlnets[0],
                                                        segmentation, scenes, steps, guidance)
    transfer, transfer_images = transfer_sweep(pipe, fine_tune, controlled.controlnets[0],
                                               fine_tune_data, steps, guidance)
    at_one = STRENGTHS.index(1.0)
    figures = {
        **strength_figures(strength, strength_images, base_alone["iou"], data.condition, label),
        **timing_figures(window, window_images, base_alone["iou"], data.condition, label),
        "06_residuals_during_sampling": plot_residual_heatmap(
            magnitudes, title=f"The 13 residuals' RMS during sampling ({label})"),
        **prompt_free_figures(prompt_free, prompt_free_images, strength[at_one]["layout_iou"],
                              data.condition, label),
        **composition_figures(composition, composition_images, scenes),
        **transfer_figures(transfer, transfer_images, strength[at_one], strength_images[at_one],
                           data.condition, fine_tune_label),
    }
    numbers = control_numbers(base_alone, strength, window, magnitudes, prompt_free, composition,
                              transfer, fine_tune_label, steps, guidance)
    return numbers, figures


def control_measurements(folder: str, base: str, fine_tune: str, segmentation: str,
                         samples: int, profile: str = "quick") -> tuple[dict, dict]:
    """``python -m cnet control``: every measurement of notebook 06 for the ControlNet in
    ``folder`` on ``base`` (composed with the ``segmentation`` ControlNet, transferred to the
    ``fine_tune`` of the base), on ``samples`` evaluation conditions with ``profile``'s sampler.
    Returns :func:`measure_control`'s numbers and figures."""
    from pathlib import Path

    from ..train import cache_data, load_base, load_controlnet
    from ..train.config import SettingError
    from ..train.evaluate import sampler_settings
    from ..world.finetune import style_of
    from .composition import composition_scenes

    controlnet = load_controlnet(folder)  # FileNotFoundError, one line, for a wrong folder
    torch.manual_seed(0)
    pipe = load_base(base)
    if not (Path(fine_tune) / "model_index.json").exists():
        raise FileNotFoundError(f"--fine_tune: no diffusers pipeline folder at {fine_tune}; "
                                "make one with `python -m cnet.world finetune`")
    tuned = load_base(fine_tune)
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")}
              for m in (pipe.unet, tuned.unet)]
    if public[0] != public[1]:
        raise SettingError(f"fine_tune: {fine_tune} is not allowed; expected a fine-tune of "
                           f"{base} (its U-Net has another configuration)")
    controlled = ControlledUNet(pipe.unet, controlnet).eval()
    data = cache_data(pipe, "fill", samples, "eval", seed=0)
    tuned_data = cache_data(tuned, "fill", samples, "eval", seed=0, style=style_of(fine_tune))
    return measure_control(pipe, controlled, data, load_controlnet(segmentation),
                           composition_scenes(samples, seed=0), tuned, tuned_data,
                           **sampler_settings(profile), label=Path(folder).name,
                           fine_tune_label=Path(fine_tune).name)
