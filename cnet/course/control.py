r"""Notebook 06's figures: control on a trained ControlNet, drawn from what
:mod:`cnet.experiments.control` measures (its sweeps' rows and images)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..experiments.composition import CompositionData
from ..experiments.control import PROMPT_FREE_MODES, STRENGTHS, WINDOWS

__all__ = [
    "composition_figures",
    "control_figures",
    "plot_residual_heatmap",
    "plot_sample_strip",
    "plot_sweep",
    "prompt_free_figures",
    "strength_figures",
    "timing_figures",
    "transfer_figures",
]


def plot_sweep(
    rows: list[dict],
    x: Sequence[float],
    xlabel: str,
    title: str = "",
    ceiling: float | None = None,
    base: float | None = None,
    categorical: bool = False,
):
    """Fidelity (IoU) and prompt adherence (both colours drawn) against a knob; points of a
    ``categorical`` knob (e.g. windows of the sampling steps) are not joined by lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    joined = ("", "") if categorical else ("-", "--")
    ax.plot(
        x, [r["iou"] for r in rows], "o" + joined[0], label="fidelity (IoU with the requested disc)"
    )
    ax.plot(
        x, [r["colours_ok"] for r in rows], "s" + joined[1], label="both prompted colours drawn"
    )
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", lw=0.8, ls=":", label=f"VAE ceiling {ceiling:.2f}")
    if base is not None:
        ax.axhline(base, color="tab:red", lw=0.8, ls=":", label=f"base alone {base:.2f}")
    ax.set(xlabel=xlabel, ylim=(0, 1.05), title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_sample_strip(
    images: torch.Tensor,
    labels: Sequence[str],
    conditions: torch.Tensor,
    title: str = "",
    regions: torch.Tensor | None = None,
    cell: float = 1.1,
):
    """Rows: conditions; columns: the condition, then one image per setting. Where ``regions``
    (one per condition, H, W, bool; extra ones are ignored) is given, the region each condition
    asks for is outlined over every sample of its row, dashed, so that following and missing it
    read apart at a glance.
    ``cell``: inches per picture (1.1 shows a 64 px sample at about twice its size)."""
    import matplotlib.pyplot as plt

    from .training_plots import outline_region

    settings, n = images.shape[:2]
    fig, axes = plt.subplots(
        n,
        settings + 1,
        figsize=(cell * (settings + 1), (cell + 0.05) * n + 0.4),
        squeeze=False,
    )
    for row in range(n):
        axes[row, 0].imshow(conditions[row].permute(1, 2, 0).numpy(), interpolation="nearest")
        for col in range(settings):
            picture = ((images[col, row] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            axes[row, col + 1].imshow(picture, interpolation="nearest")
            if regions is not None:
                # unsmoothed: notebook 06 stores four such strips and stays under its size
                outline_region(axes[row, col + 1], regions[row], antialiased=False)
    for col, label in enumerate(["condition", *labels]):
        axes[0, col].set_title(label, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    if title or regions is not None:
        dashed = "(dashed: the region the condition asks for)" if regions is not None else ""
        fig.suptitle("\n".join(t for t in (title, dashed) if t), fontsize=9)
    fig.tight_layout()
    return fig


def plot_residual_heatmap(magnitudes: torch.Tensor, title: str = ""):
    """The 13 residuals' RMS (rows) at each sampling step (columns), one colour scale per row
    relative to its own largest value, so that every residual's timing shows; each row's
    largest RMS is written on the right, so that their sizes show too."""
    import matplotlib.pyplot as plt

    largest = magnitudes.amax(dim=1, keepdim=True).clamp(min=1e-12)
    fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    image = ax.imshow((magnitudes / largest).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    rows = range(magnitudes.shape[0])
    ax.set(
        xlabel="sampling step (DDIM, first = noisiest)",
        ylabel="residual",
        xticks=range(0, magnitudes.shape[1], 2),
        yticks=rows,
        yticklabels=[f"{i}" if i < len(rows) - 1 else f"{i} (middle)" for i in rows],
        title=title,
    )
    sizes = ax.twinx()
    sizes.set(ylim=ax.get_ylim(), yticks=rows, ylabel="its largest RMS")
    sizes.set_yticklabels([f"{float(v):.2g}" for v in largest[:, 0]])
    for axis in (ax, sizes):
        axis.tick_params(labelsize=7)
    fig.colorbar(image, ax=[ax, sizes], label="RMS / its row's largest", pad=0.02)
    return fig


# ------------------------------------------------------------------------------ what ships


def strength_figures(
    rows: list[dict],
    images: torch.Tensor,
    base_iou: float,
    conditions: torch.Tensor,
    label: str,
    regions: torch.Tensor | None = None,
) -> dict:
    """``06_strength`` (fidelity against the scale) and ``06_strength_samples`` (six conditions
    at scales 0, 0.25, 0.5, 1 and 2) of a :func:`strength_sweep` over :data:`STRENGTHS`."""
    shown = [STRENGTHS.index(s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    title = f"{label}: fidelity against strength ({images.shape[1]} conditions)"
    return {
        "06_strength": plot_sweep(
            rows, STRENGTHS, "conditioning scale s", base=base_iou, title=title
        ),
        "06_strength_samples": plot_sample_strip(
            images[shown, :6],
            [f"s = {STRENGTHS[i]}" for i in shown],
            conditions[:6],
            title="Same conditions and seeds, scale by scale",
            regions=regions,
        ),
    }


def timing_figures(
    rows: list[dict],
    images: torch.Tensor,
    base_iou: float,
    conditions: torch.Tensor,
    label: str,
    regions: torch.Tensor | None = None,
) -> dict:
    """``06_timing`` (fidelity against the window) and ``06_timing_samples`` of a
    :func:`window_sweep` over :data:`WINDOWS`."""
    labels = [f"[{s:.2f}, {e:.2f}]" for s, e in WINDOWS]
    title = f"{label}: fidelity against the control window ({images.shape[1]} conditions)"
    sweep = plot_sweep(
        rows,
        range(len(WINDOWS)),
        "control window (fractions of the sampling steps)",
        base=base_iou,
        title=title,
        categorical=True,
    )
    sweep.axes[0].set_xticks(range(len(WINDOWS)), labels, fontsize=7)
    return {
        "06_timing": sweep,
        "06_timing_samples": plot_sample_strip(
            images[:, :6],
            labels,
            conditions[:6],
            title="Same conditions and seeds, window by window",
            regions=regions,
        ),
    }


def prompt_free_figures(
    rows: list[dict],
    images: torch.Tensor,
    prompted_layout_iou: float,
    conditions: torch.Tensor,
    label: str,
    regions: torch.Tensor | None = None,
) -> dict:
    """``06_prompt_free`` (layout IoU of each way of applying control to the empty prompt, at
    each guidance scale) and ``06_prompt_free_samples`` of a :func:`prompt_free_sweep`."""
    import matplotlib.pyplot as plt

    guidances = sorted({r["guidance"] for r in rows[1:]})
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(guidances)
    for k, guidance in enumerate(guidances):
        chosen = [r for r in rows[1:] if r["guidance"] == guidance]
        bars = ax.bar(
            [m + (k - (len(guidances) - 1) / 2) * width for m in range(len(chosen))],
            [r["layout_iou"] for r in chosen],
            width,
            label=f"guidance {guidance:g}",
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(
        rows[0]["layout_iou"],
        color="tab:red",
        lw=0.8,
        ls=":",
        label=f"base alone {rows[0]['layout_iou']:.2f}",
    )
    ax.axhline(
        prompted_layout_iou,
        color="gray",
        lw=0.8,
        ls="--",
        label=f"with the prompt, scale 1: {prompted_layout_iou:.2f}",
    )
    ax.set_xticks(range(len(PROMPT_FREE_MODES)), list(PROMPT_FREE_MODES), fontsize=8)
    ax.set(
        ylabel="layout IoU (any colour)",
        ylim=(0, 1.3),
        yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0],
        title=f"{label} with the empty prompt ({rows[0]['n']} conditions)",
    )
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    labels = ["base alone"] + [f"{r['mode'].split(' (')[0]}, g {r['guidance']:g}" for r in rows[1:]]
    return {
        "06_prompt_free": fig,
        "06_prompt_free_samples": plot_sample_strip(
            images[:, :4],
            labels,
            conditions[:4],
            title="The empty prompt: same conditions and seeds, mode by mode",
            regions=regions,
        ),
    }


def transfer_figures(
    rows: list[dict],
    images: torch.Tensor,
    on_base: dict,
    on_base_images: torch.Tensor,
    conditions: torch.Tensor,
    fine_tune: str,
    regions: torch.Tensor | None = None,
) -> dict:
    """``06_transfer``: the ControlNet on its own base, then the :func:`transfer_sweep` on the
    fine-tune, six conditions, each column titled with its mean IoU."""
    labels = [f"base + ControlNet\nIoU {on_base['iou']:.2f}"] + [
        f"{r['model'].replace('ControlNet ', 'CN ')}\nIoU {r['iou']:.2f}" for r in rows
    ]
    strip = torch.cat([on_base_images[None, :6], images[:, :6]])
    return {
        "06_transfer": plot_sample_strip(
            strip,
            labels,
            conditions[:6],
            title=f"The same prompts on the base and on its fine-tune {fine_tune}",
            regions=regions,
        )
    }


def composition_figures(rows: list[dict], images: torch.Tensor, data: CompositionData) -> dict:
    """``06_composition``: six scenes, their two conditions in one picture, then one column per
    row of :func:`composition_sweep`, titled with both objects' mean layout IoU."""
    # the two conditions in one picture: the circle's outline over the shape's class map
    shown = torch.maximum(data.outline[:6], data.segmentation[:6])
    names = [r["composition"].replace(", ", ",\n") for r in rows]
    labels = [
        f"{name}\ncircle {r['circle_layout_iou']:.2f}, shape {r['shape_layout_iou']:.2f}"
        for name, r in zip(names, rows, strict=True)
    ]
    return {
        "06_composition": plot_sample_strip(
            images[:, :6],
            labels,
            shown,
            title="Two objects, two ControlNets: each object's layout IoU with its region",
            cell=1.3,  # room for two lines of numbers under each column's name
        )
    }


def control_figures(
    numbers: dict,
    images: dict,
    label: str = "controlnet-fill",
    fine_tune_label: str = "miniature-sd-cycled",
) -> dict:
    """Every figure of notebook 06 (name -> figure), from
    :func:`cnet.experiments.control.measure_control`'s numbers and images."""
    conditions, base_iou = images["conditions"], numbers["base_alone"]["iou"]
    regions = images.get("regions")
    at_one = STRENGTHS.index(1.0)
    on_base = numbers["strength"][at_one]
    magnitudes = torch.tensor(numbers["residual_rms"])
    return {
        **strength_figures(
            numbers["strength"], images["strength"], base_iou, conditions, label, regions
        ),
        **timing_figures(numbers["window"], images["window"], base_iou, conditions, label, regions),
        "06_residuals_during_sampling": plot_residual_heatmap(
            magnitudes, title=f"The 13 residuals' RMS during sampling ({label})"
        ),
        **prompt_free_figures(
            numbers["prompt_free"],
            images["prompt_free"],
            on_base["layout_iou"],
            conditions,
            label,
            regions,
        ),
        **composition_figures(numbers["composition"], images["composition"], images["scenes"]),
        **transfer_figures(
            numbers["transfer"]["rows"],
            images["transfer"],
            on_base,
            images["strength"][at_one],
            conditions,
            fine_tune_label,
            regions,
        ),
    }
