r"""Control on a trained ControlNet, measured (notebook 06): how strongly, and when.

* **Strength**: every residual times one conditioning scale :math:`s` (paper §3.2's scales,
  diffusers' ``controlnet_conditioning_scale``); fidelity against :math:`s`, from the base alone
  at :math:`s = 0` (Eq. 4's situation: zero residuals) upwards.
* **Timing**: control only within a window of the sampling steps (diffusers'
  ``control_guidance_start`` / ``control_guidance_end``), and the 13 residuals' magnitudes at
  every step of sampling.

Every number is the one fidelity definition (:func:`cnet.train.fidelity`) on a fixed evaluation
set with fixed seeds; ``python -m cnet control`` recomputes them into a JSON beside the figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline

from ..injection import ControlledUNet
from ..sample import sample
from ..train.data import CachedData
from ..train.evaluate import FULL_SAMPLER, evaluate

__all__ = [
    "STRENGTHS", "WINDOWS", "control_numbers", "measure_control", "plot_residual_heatmap",
    "plot_sample_strip", "plot_sweep", "residual_magnitudes", "strength_figures",
    "strength_sweep", "timing_figures", "window_sweep",
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


def control_numbers(base_alone: dict, strength: list[dict], window: list[dict],
                    magnitudes: torch.Tensor, steps: int, guidance: float) -> dict:
    """The numbers behind notebook 06's figures, as ``figures/06_control.json`` holds them."""
    return {"conditions": base_alone["n"],
            "sampler": f"DDIM, {steps} steps, guidance {guidance}, seed 1234",
            "base_alone": base_alone, "strength": strength, "window": window,
            "residual_rms": magnitudes.tolist()}


def measure_control(pipe: StableDiffusionPipeline, controlled: ControlledUNet, data: CachedData,
                    steps: int = FULL_SAMPLER["steps"], guidance: float = FULL_SAMPLER["guidance"],
                    label: str = "controlnet-fill") -> tuple[dict, dict]:
    """Everything notebook 06 measures, section by section as the notebook does it: the numbers
    and the figures (name -> figure) that ``python -m cnet control`` writes."""
    base_alone, _ = evaluate(pipe, None, data, steps, guidance)
    strength, strength_images = strength_sweep(pipe, controlled, data, STRENGTHS, steps, guidance)
    window, window_images = window_sweep(pipe, controlled, data, WINDOWS, steps, guidance)
    magnitudes = residual_magnitudes(pipe, controlled, data, steps, guidance)
    figures = {
        **strength_figures(strength, strength_images, base_alone["iou"], data.condition, label),
        **timing_figures(window, window_images, base_alone["iou"], data.condition, label),
        "06_residuals_during_sampling": plot_residual_heatmap(
            magnitudes, title=f"The 13 residuals' RMS during sampling ({label})"),
    }
    return control_numbers(base_alone, strength, window, magnitudes, steps, guidance), figures
