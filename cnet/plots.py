"""Figures the notebooks and the command line draw. Each function returns its matplotlib Figure;
``save_figure`` writes it to figures/ as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .paths import figures_dir


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Write ``fig`` to figures/<name>.png and return the path."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _zero_aware_log_axis(ax: plt.Axes, values: list[float]) -> None:
    # symlog keeps exact zeros on the axis, where a log scale would silently drop them
    positive = [v for v in values if v > 0]
    ax.set_yscale("symlog", linthresh=min(positive) / 10 if positive else 1e-12)


def plot_zero_conv_trajectory(traj, title: str = "") -> plt.Figure:
    """‖W‖ and ‖∂L/∂I‖ per step for a zero convolution trained from zero (Eq. 6–8)."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    steps = range(len(traj.weight_norm))
    series = [
        (traj.weight_norm, "‖W‖ (weight, Eq. 7)", "tab:blue"),
        (traj.input_grad_norm, "‖∂L/∂I‖ (to the input, Eq. 6 → 8)", "tab:red"),
        (traj.loss, "loss", "tab:gray"),
    ]
    for ax, (values, label, colour) in zip(axes, series):
        ax.plot(steps, values, "o-", color=colour, ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _zero_aware_log_axis(axes[1], traj.input_grad_norm)
    for ax, values in ((axes[0], traj.weight_norm), (axes[1], traj.input_grad_norm)):
        ax.annotate(f"{values[0]:g} at step 0", (0, values[0]), xytext=(8, 8),
                    textcoords="offset points", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_gradient_flow(flow, steps: tuple[int, ...] = (0, 1)) -> plt.Figure:
    """Gradient norm of every trainable parameter of a ControlledBlock at the given steps
    (0-based). Exact zeros are drawn as hollow markers on the axis floor."""
    names, groups, per_step = [], [], {s: [] for s in steps}
    for group in ("z2", "theta_c", "z1"):
        for name, norms in getattr(flow, group).items():
            names.append(f"{group}.{name}")
            groups.append(group)
            for s in steps:
                per_step[s].append(norms[s])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    positive = [v for vals in per_step.values() for v in vals if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    width = 0.8 / len(steps)
    for k, s in enumerate(steps):
        xs = [i + (k - (len(steps) - 1) / 2) * width for i in range(len(names))]
        vals = per_step[s]
        ax.bar(xs, [v if v > 0 else 0 for v in vals], width, label=f"step {s + 1}",
               color=f"C{k}")
        zx = [x for x, v in zip(xs, vals) if v == 0]
        ax.plot(zx, [floor] * len(zx), "o", mfc="none", color=f"C{k}",
                label=f"step {s + 1}: exactly 0" if zx else None)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("‖∂L/∂θ‖")
    ax.set_title("Where the gradient flows: step 1 vs step 2", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_output_deviation(curves: dict[str, list[float]]) -> plt.Figure:
    """‖y_c − y‖/‖y‖ per training step, one curve per way of initialising the connections."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, "o-", ms=3, label=label)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("training step")
    ax.set_ylabel("‖y_c − y‖ / ‖y‖")
    ax.set_title("How far the controlled block is from the locked one", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_zero_conv_grads(grad_I, grad_W, grad_B, title: str = "") -> plt.Figure:
    """The three gradients of Eq. 6 side by side: ∂L/∂I (one sample, channel 0), ∂L/∂W, ∂L/∂B."""
    panels = [
        (grad_I[0, 0], "∂L/∂I  (sample 0, channel 0)"),
        (grad_W.reshape(grad_W.shape[0], -1), "∂L/∂W  (C_out × C_in)"),
        (grad_B[:, None], "∂L/∂B"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), gridspec_kw={"width_ratios": [3, 3, 1]})
    for ax, (values, label) in zip(axes, panels):
        values = values.detach().double().numpy()
        bound = max(abs(values).max(), 1e-12)
        im = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(label + ("\nexactly 0 everywhere" if not values.any() else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
