"""Notebook 07's figures, drawn from the ablations' summary
(:func:`cnet.experiments.ablate.summarize`): the convergence curve over seeds, each study's
curves with their seed spread, the step-0 damage of other connections, the first three updates,
and sample grids read from the runs' folders."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from safetensors.torch import load_file

from ..experiments.recipe import COLLAPSE_SHARE, collapsed
from ..train.runs import read_config
from .figures import conditions_the_base_misses, save_figure
from .training_plots import plot_sample_grid

__all__ = [
    "plot_first_updates",
    "plot_seed_convergence",
    "plot_step0_damage",
    "plot_study",
    "samples_around_onset",
    "step0_samples",
    "write_ablation_figures",
]

LABELS = {
    "default": "ControlNet (zero convs)",
    "gaussian": "Gaussian convs (std × 1)",
    "gaussian-0.1": "Gaussian convs (std × 0.1)",
    "none": "no connection layer",
    "lite": "ControlNet-lite",
    "no-empty-prompts": "0 % empty prompts",
    "data-1k": "1k samples",
    "data-20k": "20k samples",
    "gaussian-lr": "Gaussian convs (std = lr)",
    "accum-2": "2 micro-batches / update",
    "default-2x": "ControlNet, 2× steps",
    "gaussian-2x": "Gaussian convs (std × 1), 2× steps",
    "lite-2x": "ControlNet-lite, 2× steps",
}
#: The connection variants, in the order figures draw them.
CONNECTION_VARIANTS = ("default", "gaussian-lr", "gaussian-0.1", "gaussian", "none")


def _label(variant: str) -> str:
    return LABELS.get(variant, variant)


def plot_seed_convergence(result: dict, variant: str = "default") -> plt.Figure:
    """Fidelity of each seed's run (onsets marked) above the condition encoder's zero-conv
    weight norm and the trainable copy's gradient norm, on one step axis."""
    runs = result["variants"][variant]["runs"]
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 7), sharex=True)
    for run, colour in zip(runs, plt.cm.tab10.colors, strict=False):
        c = run["curves"]
        label = f"seed {run['seed']}" + (
            f", onset {run['onset']}" if run["onset"] else ", no onset"
        )
        axes[0].plot(c["eval_steps"], c["iou"], "o-", ms=3, color=colour, label=label)
        if run["onset"]:
            axes[0].axvline(run["onset"], color=colour, ls=":", lw=1)
        axes[1].plot(c["norm_steps"], c["hint_weight_norm"], color=colour, label=label)
        axes[2].plot(c["norm_steps"], c["copy_grad_norm"], color=colour, lw=0.8, label=label)
    axes[0].set_ylabel("IoU with the condition")
    axes[0].set_title(
        f"{_label(variant)}: {len(runs)} seeds, evaluated every "
        f"{runs[0]['curves']['eval_steps'][1]} steps",
        fontsize=10,
    )
    axes[1].set_ylabel("‖Θ_z1‖ (encoder's zero conv)")
    axes[2].set_ylabel("‖∇Θ_c‖ (copy; 0 at update 1)")
    axes[2].set_xlabel("training step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_study(result: dict, study: str, measure: str = "iou") -> plt.Figure:
    """Each variant of ``study``, each seed a thin line of the variant's colour: a dot where
    the run's onset is, a cross at the end of a run that collapsed (final below
    ``COLLAPSE_SHARE`` × its best). No mean: runs that jump and runs that do not would average
    into a ramp that none of them took."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    drawn: list[tuple[str, list, np.ndarray]] = []
    names = result["studies"][study]["variants"]
    accumulation = {v: result["variants"][v]["settings"].get("grad_accum", 1) for v in names}
    # variants that draw more samples per update are compared at the same samples drawn
    per_update = (
        {v: result["settings"]["batch_size"] * a for v, a in accumulation.items()}
        if len(set(accumulation.values())) > 1
        else None
    )
    for variant, colour in zip(names, plt.cm.tab10.colors, strict=False):
        runs = result["variants"][variant]["runs"]
        steps = runs[0]["curves"]["eval_steps"]
        if per_update:
            steps = [s * per_update[variant] for s in steps]
        values = np.array([r["curves"][measure] for r in runs])
        onsets = sum(r["onset"] is not None for r in runs)
        label = f"{_label(variant)}: onset on {onsets} of {len(runs)} seeds"
        # a longer run of the same seeds repeats a shorter one's curve: say so, and draw it
        # dashed over the other, so that neither hides the other
        repeats = False
        for name, earlier_steps, earlier in drawn:
            n = min(len(earlier_steps), len(steps))
            if steps[:n] == earlier_steps[:n] and np.array_equal(values[:, :n], earlier[:, :n]):
                label += f" (the same runs as {name} to step {steps[n - 1]})"
                repeats = True
        style = {"lw": 0.9, "ls": "--"} if repeats else {"lw": 1.1}
        for i, run in enumerate(runs):
            ax.plot(
                steps, values[i], color=colour, alpha=0.85, label=label if i == 0 else None, **style
            )
            if run["onset"] is not None:
                k = run["curves"]["eval_steps"].index(run["onset"])
                ax.plot(steps[k], values[i][k], "o", ms=4, color=colour)
            if measure == "iou" and collapsed(run["curves"]["iou"]):
                ax.plot(steps[-1], values[i][-1], "x", ms=8, mew=2, color=colour)
        drawn.append((_label(variant), steps, values))
    ax.plot(np.nan, np.nan, "ko", ms=4, label="onset")
    if measure == "iou":
        ax.plot(np.nan, np.nan, "kx", ms=8, mew=2, label=f"collapsed (< {COLLAPSE_SHARE} × best)")
    ax.set_xlabel("training samples drawn" if per_update else "training step")
    ax.set_ylabel(
        {
            "iou": "IoU with the condition",
            "colours_ok": "colours right",
            "layout_iou": "layout IoU",
        }.get(measure, measure)
    )
    ax.set_title(f"{study.replace('_', ' ')}: one line per seed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: no curve hidden
    fig.tight_layout()
    return fig


def _bar_label(label: str) -> str:
    """``"Gaussian convs (std × 1)"`` → three short lines, the parenthesis kept whole."""
    head, _, tail = label.partition(" (")
    return textwrap.fill(head, 12) + (f"\n({tail}" if tail else "")


def plot_step0_damage(result: dict, variants=CONNECTION_VARIANTS) -> plt.Figure:
    """Before any update: how far each connection's controlled U-Net predicts from the locked
    one, and what that does to the samples' colours (the prompt) and to their IoU."""
    variants = [v for v in variants if v in result["variants"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(
        axes,
        ("step0_deviation", "step0_colours_ok", "step0_iou"),
        ("‖ε_c − ε‖ / ‖ε‖ at step 0", "colours right at step 0", "IoU at step 0"),
        strict=True,
    ):
        stats = [result["variants"][v]["aggregate"][key] for v in variants]
        means = [s.get("mean", np.nan) for s in stats]
        errors = [
            [m - s.get("min", m) for m, s in zip(means, stats, strict=True)],
            [s.get("max", m) - m for m, s in zip(means, stats, strict=True)],
        ]
        ax.bar(
            range(len(variants)),
            means,
            yerr=errors,
            capsize=3,
            color=plt.cm.tab10.colors[: len(variants)],
        )
        # labels wrapped to the bar's width, so that neighbours do not run into each other
        ax.set_xticks(range(len(variants)), [_bar_label(_label(v)) for v in variants], fontsize=7)
        for x, mean in enumerate(means):
            if mean == 0:  # a bar of height 0 cannot be seen: say it
                ax.annotate(
                    "0, exactly",
                    (x, 0),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_first_updates(first: dict) -> plt.Figure:
    """The gradient norm of each parameter group at updates 1, 2, 3: exact zeros drawn as
    empty bars labelled 0."""
    updates = first["updates"]
    groups = list(updates[0])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(groups)
    for g, (group, colour) in enumerate(zip(groups, plt.cm.tab10.colors, strict=False)):
        for k, update in enumerate(updates):
            x = k + (g - (len(groups) - 1) / 2) * width
            norm = update[group]["grad_norm"]
            if update[group]["grad_exactly_zero"]:
                ax.bar(x, 1e-7, width, bottom=1e-8, fill=False, edgecolor=colour, hatch="//")
                ax.text(x, 2e-7, "0", ha="center", fontsize=8)
            else:
                ax.bar(x, norm - 1e-8, width, bottom=1e-8, color=colour)
        ax.bar(np.nan, np.nan, color=colour, label=group)
    ax.set_yscale("log")
    ax.set_xticks(range(len(updates)), [f"update {k + 1}" for k in range(len(updates))])
    ax.set_ylabel("gradient norm (hatched: exactly 0)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(
        "Which parameters get gradient, update by update (the real training step)", fontsize=10
    )
    fig.tight_layout()
    return fig


def samples_around_onset(run: dict, rows: int = 6) -> plt.Figure | None:
    """A run's evaluation samples at step 0, the two evaluations before its onset, the onset,
    the one after, and the end, on the ``rows`` conditions the locked base followed worst,
    each condition's region outlined over its samples (None where the run's folder is not
    here or it has no onset)."""
    folder = Path(run["run"])
    if run["onset"] is None or not (folder / "samples.safetensors").exists():
        return None
    samples = load_file(folder / "samples.safetensors")
    steps = run["curves"]["eval_steps"]
    i = steps.index(run["onset"])
    shown = sorted({steps[0], *steps[max(i - 2, 0) : i + 2], steps[-1]})
    conditions, regions, ranked = conditions_the_base_misses(
        read_config(folder), samples[f"step_{steps[0]}"]
    )
    picked = ranked[:rows]
    return plot_sample_grid(
        {k: v[picked] for k, v in samples.items()},
        conditions[picked],
        shown,
        label=f"seed {run['seed']}: onset at step {run['onset']}; the {rows} conditions the "
        "base followed worst",
        regions=regions[picked],
    )


def step0_samples(
    result: dict, variants=CONNECTION_VARIANTS, columns: int = 8
) -> plt.Figure | None:
    """Seed 0's evaluation samples before any update, one row per connection variant (None
    where the runs' folders are not here)."""
    rows = []
    for variant in variants:
        if variant not in result["variants"]:  # not run (yet): its row is left out
            continue
        path = Path(result["variants"][variant]["runs"][0]["run"]) / "samples.safetensors"
        if not path.exists():
            return None
        rows.append((variant, load_file(path)["step_0"][:columns]))
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(1.2 * columns, 1.3 * len(rows)), squeeze=False
    )
    for r, (variant, images) in enumerate(rows):
        for c in range(columns):
            axes[r, c].imshow(images[c].permute(1, 2, 0).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(_label(variant).replace(" (", "\n("), fontsize=7)
    fig.suptitle("Step 0, before any update: the same prompts, conditions and noise", fontsize=9)
    fig.tight_layout()
    return fig


def write_ablation_figures(result: dict, folder: str | Path | None = None) -> list[Path]:
    """Every figure of notebook 07 as ``07_*.png`` in ``folder`` (default: figures/)."""
    longest = "default-2x" if "default-2x" in result["variants"] else "default"
    figures = {"07_seed_convergence": plot_seed_convergence(result, longest)}
    for study in result["studies"]:  # the seeds study is the seed convergence figure's top
        if study != "seeds" and len(result["studies"][study]["variants"]) > 1:
            figures[f"07_{study}"] = plot_study(result, study)
    if "connections" in result["studies"]:
        figures["07_step0_damage"] = plot_step0_damage(result)
        grid = step0_samples(result)
        if grid is not None:
            figures["07_step0_samples"] = grid
    if "prompt_dropout" in result["studies"]:
        figures["07_prompt_dropout_layout"] = plot_study(result, "prompt_dropout", "layout_iou")
    if "first_updates" in result:
        figures["07_first_updates"] = plot_first_updates(result["first_updates"])
    grid = samples_around_onset(result["variants"][longest]["runs"][0])
    if grid is not None:
        figures["07_samples_around_onset"] = grid
    # the sample grids are many small images: a lower resolution keeps them light in a notebook
    paths = [
        save_figure(fig, name, folder, dpi=75 if "samples" in name else 110)
        for name, fig in figures.items()
    ]
    plt.close("all")
    return paths
