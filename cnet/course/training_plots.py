"""Figures of a ControlNet training run (notebook 05 and ``python -m cnet train``): curves and
samples from a run's ``log.jsonl`` and ``samples.safetensors``. Each function returns its
matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..train.config import TrainConfig
from .recipe_report import seed_list

# ------------------------------------------------------------------------------------------
# Training a ControlNet: curves and samples from a run's log.jsonl and samples.safetensors
# ------------------------------------------------------------------------------------------


def _smooth(values, window: int):
    import numpy as np

    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(
        np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid"
    )


def plot_fidelity_and_loss(log, report=None, label: str = "") -> plt.Figure:
    """Condition fidelity (IoU) per evaluation with the detected convergence step marked, and
    the training loss on the same step axis: the loss barely shows what fidelity does."""
    fig, ax = plt.subplots(figsize=(8, 4.4))
    ax.plot(log.eval_steps, log.eval_iou, "o-", ms=3, color="tab:blue", label="fidelity (IoU)")
    ax.plot(
        log.eval_steps,
        log.eval_colours,
        "s-",
        ms=2,
        color="tab:green",
        alpha=0.6,
        label="prompted colours drawn",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("fidelity on the evaluation set")
    ax.set_ylim(0, 1)
    if report is not None and report.converged:
        ax.axvspan(report.start, report.end, color="tab:orange", alpha=0.15)
        ax.axvline(
            report.step,
            color="tab:orange",
            ls="--",
            label=f"convergence step {report.step}"
            f" ({'sudden' if report.sudden else 'gradual'}, "
            f"abruptness {report.abruptness:.2f}; sharpest rise "
            f"{report.sharpest_share:.0%} of the gain, at step "
            f"{report.sharpest_step})",
        )
    loss_ax = ax.twinx()
    window = max(1, len(log.loss) // 100)
    loss_ax.plot(
        log.steps,
        _smooth(log.loss, window),
        color="tab:gray",
        lw=1,
        alpha=0.8,
        label=f"loss (running mean of {window})",
    )
    loss_ax.set_ylabel("training loss")
    lines = ax.get_legend_handles_labels()
    more = loss_ax.get_legend_handles_labels()
    # below the axes: the curves fill the whole plot area
    ax.legend(
        lines[0] + more[0],
        lines[1] + more[1],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=2,
        frameon=False,
    )
    ax.set_title(f"Fidelity and loss during training{' — ' + label if label else ''}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_zero_conv_growth(log, label: str = "") -> plt.Figure:
    """Weight norm of every zero convolution from step 0 (exactly 0 there): the 12 + 1 residual
    ones and the condition encoder's."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = list(log.weight_norm)
    cmap = plt.get_cmap("viridis")
    for k, name in enumerate(names):
        is_hint, is_mid = name.endswith("hint"), name.endswith("mid")
        ax.plot(
            log.steps,
            log.weight_norm[name],
            lw=2 if (is_hint or is_mid) else 1,
            color="tab:red" if is_hint else ("black" if is_mid else cmap(k / len(names))),
            label=name.replace("zero_conv.", ""),
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("‖(W, B)‖ (Frobenius norm)")
    ax.set_title(f"Zero convolutions leaving zero{' — ' + label if label else ''}", fontsize=10)
    ax.legend(
        fontsize=6,
        ncol=2,
        title="zero conv",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )  # all 14 named, beside the axes
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_first_step_gradients(log, steps: int = 8, label: str = "") -> plt.Figure:
    """Gradient norm of the trainable copy Θ_c and of the condition encoder's zero conv at
    steps 1, 2, 3, …: exactly zero at step 1 (Eq. 6), non-zero from step 2 (Eq. 8); the
    residual zero convs' gradient, non-zero from step 1, for comparison."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [s + 1 for s in log.steps[:steps]]
    series = {
        "trainable copy Θ_c": log.copy_grad_norm[:steps],
        "condition encoder's zero conv": log.grad_norm["zero_conv.hint"][:steps],
    }
    if "zero_conv.mid" in log.grad_norm:  # a run without connection layers has none there
        series["middle zero conv (Θ_z2)"] = log.grad_norm["zero_conv.mid"][:steps]
    positive = [v for vals in series.values() for v in vals if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    for k, (name, values) in enumerate(series.items()):
        ax.plot(xs, [v if v > 0 else float("nan") for v in values], "o-", color=f"C{k}", label=name)
        zeros = [x for x, v in zip(xs, values) if v == 0]
        ax.plot(
            zeros,
            [floor] * len(zeros),
            "o",
            mfc="none",
            color=f"C{k}",
            ms=8 + 4 * k,
            label=f"{name}: exactly 0" if zeros else None,
        )
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient norm")
    ax.set_title(
        f"Where the gradient goes in the first steps{' — ' + label if label else ''}", fontsize=10
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def outline_region(ax, region, antialiased: bool = True) -> None:
    """The edge of ``region`` (H, W, bool: what a condition asks for) drawn over a sample, white
    dashes on a black line, readable on any colour (``antialiased=False``: a picture with fewer
    colours, lighter to store)."""
    for colour, width, style in (("black", 1.4, "solid"), ("white", 0.8, "dashed")):
        ax.contour(
            region.float().numpy(),
            levels=[0.5],
            colors=colour,
            linewidths=width,
            linestyles=style,
            antialiased=antialiased,
        )


def plot_sample_grid(samples: dict, conditions, steps, label: str = "", regions=None) -> plt.Figure:
    """v1 Fig. 4 (the paper's sudden-convergence samples) in miniature: the same conditions
    (rows) sampled with the same seeds at several training steps (columns). ``samples`` maps
    ``step_<n>`` to uint8 images. ``regions`` (rows, H, W) bool: the region each condition asks
    for, whose outline is drawn over every sample of its row, so that a sample that follows its
    condition and one that does not read apart at a glance."""
    rows = len(conditions)
    fig, axes = plt.subplots(
        rows, len(steps) + 1, figsize=(1.3 * (len(steps) + 1), 1.3 * rows), squeeze=False
    )
    for r in range(rows):
        axes[r, 0].imshow(conditions[r].permute(1, 2, 0).numpy())
        for c, step in enumerate(steps):
            axes[r, c + 1].imshow(samples[f"step_{step}"][r].permute(1, 2, 0).numpy())
            if regions is not None:
                outline_region(axes[r, c + 1], regions[r])
            if r == 0:
                axes[r, c + 1].set_title(f"step {step}", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("condition", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if label:
        fig.suptitle(
            label
            + ("\n(dashed: the region the condition asks for)" if regions is not None else ""),
            fontsize=9,
        )
    fig.tight_layout()
    return fig


def plot_knob_comparison(comparison: dict, knob: str, label: str = "") -> plt.Figure:
    """Fidelity curves of runs that differ in one setting (from
    :func:`cnet.experiments.compare.compare_runs`), each with its detected convergence step and
    abruptness: which knob makes the jump sudden."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colours = plt.get_cmap("plasma")
    for k, (value, entry) in enumerate(comparison.items()):
        colour = colours(k / max(1, len(comparison)))
        report = entry["report"]
        text = (
            f"{knob}={value}: step {report['step']}, abruptness {report['abruptness']:.2f}, "
            f"sharpest rise {report['sharpest_share']:.0%}"
            if report["converged"]
            else f"{knob}={value}: no jump"
        )
        ax.plot(
            entry["eval_steps"], entry["eval_iou"], "o-", ms=2.5, lw=1.2, color=colour, label=text
        )
        if report["converged"]:
            ax.axvline(report["step"], color=colour, ls="--", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("fidelity (IoU)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.set_title(f"Convergence against {knob}{' — ' + label if label else ''}", fontsize=10)
    fig.tight_layout()
    return fig


def _seed_curves_panel(ax, title: str, checked: dict) -> None:
    """One recipe or profile checked over seeds: every seed's fidelity over its run and the
    continuation to twice its steps (dotted line: the budget), onsets marked, the tally in the
    title."""
    for run in checked["runs"]:  # a seed keeps its colour in every panel
        colour = plt.cm.tab10.colors[run["seed"] % 10]
        ax.plot(run["eval_steps"], run["iou"], color=colour, lw=1, label=f"seed {run['seed']}")
        if run["onset"] is not None:
            i = run["eval_steps"].index(run["onset"])
            ax.plot(run["onset"], run["iou"][i], "o", color=colour, ms=4)
    ax.axvline(checked["runs"][0]["steps"], color="grey", ls=":", lw=1)
    longer = (
        f"collapsed at 2× {checked['collapses_2x']}/{checked['n_2x']}"
        if checked["n_2x"]
        else "not continued"
    )
    ax.set_title(f"{title}\nonset {checked['onsets']}/{checked['n']}, {longer}", fontsize=8)
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_recipe_study(result: dict) -> plt.Figure:
    """The recipe study (:func:`cnet.experiments.recipe.summarize_recipes`): one panel per recipe
    (:func:`_seed_curves_panel`)."""
    recipes = result["recipes"]
    columns = min(4, len(recipes))  # at most four panels a row: readable on a slide
    rows = -(-len(recipes) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.3 * columns, 3.2 * rows), sharey=True, squeeze=False
    )
    for ax in axes.flat[len(recipes) :]:
        ax.set_visible(False)
    for ax, (name, recipe) in zip(axes.flat, recipes.items()):
        _seed_curves_panel(ax, name, recipe)
    for row in axes:
        row[0].set_ylabel("IoU (32 evaluation conditions)", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="lower right")
    fig.suptitle(
        f"each run's budget (dotted line: {result['budget_samples']} training samples, or the "
        "steps a recipe names), then continued to twice that; dots: onsets; step 0: the "
        "locked base's fidelity",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def plot_profile_check(result: dict) -> plt.Figure:
    """A profile checked over seeds (:func:`cnet.experiments.profiles.profile_check`): every
    seed's fidelity to the profile's steps and on to twice them, onsets marked."""
    settings = TrainConfig(**result["settings"])  # the profile's values over the defaults
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    title = f"{result['profile']} profile, seeds {seed_list(result['seeds'])}"
    _seed_curves_panel(ax, title, result)
    ax.set_ylabel(f"IoU ({settings.eval_size} evaluation conditions)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"dotted line: the profile's {settings.steps} updates, then continued to twice them; "
        "dots: onsets",
        fontsize=8,
    )
    fig.tight_layout()
    return fig
