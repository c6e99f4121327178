"""Figures of the lessons, the miniature world and the U-Net's injection points (notebooks
01–04). Each function returns its matplotlib Figure; :func:`cnet.course.figures.save_figure`
writes one to figures/. The training figures are in :mod:`cnet.course.training_plots`."""

from __future__ import annotations

import matplotlib.pyplot as plt


def _zero_aware_log_axis(ax: plt.Axes, values: list[float]) -> None:
    # symlog keeps exact zeros on the axis, where a log scale would silently drop them
    positive = [v for v in values if v > 0]
    ax.set_yscale("symlog", linthresh=min(positive) / 10 if positive else 1e-12)


#: Past this a norm has run away (plain gradient descent with too large a step): the plot stops
#: there and says so, instead of stretching its axis to 1e157.
RUNAWAY = 1e6


def plot_zero_conv_trajectory(traj, title: str = "") -> plt.Figure:
    """‖W‖ and ‖∂L/∂I‖ per step for a zero convolution trained from zero (Eq. 6–8)."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    series = [
        (traj.weight_norm, "‖W‖ (weight, Eq. 7)", "tab:blue"),
        (traj.input_grad_norm, "‖∂L/∂I‖ (to the input, Eq. 6 → 8)", "tab:red"),
        (traj.loss, "loss", "tab:gray"),
    ]
    # the steps before any series runs away (or stops being a number)
    kept = len(traj.weight_norm)
    for values, _, _ in series:
        bad = [i for i, v in enumerate(values) if not abs(v) < RUNAWAY]
        kept = min([kept, *bad])
    for ax, (values, label, colour) in zip(axes, series, strict=True):
        ax.plot(range(kept), values[:kept], "o-", color=colour, ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_xlim(-0.5, max(len(values) - 0.5, 1))
        ax.grid(alpha=0.3)
        if kept < len(values):
            ax.text(
                0.97,
                0.5,
                f"runs away after step {kept - 1}:\nbeyond {RUNAWAY:.0e} at step {kept}",
                transform=ax.transAxes,
                ha="right",
                va="center",
                fontsize=8,
                color="tab:red",
            )
    grads = traj.input_grad_norm[:kept]
    if any(v > 0 for v in grads):
        _zero_aware_log_axis(axes[1], grads)
        axes[1].set_ylim(bottom=0)
    else:  # input scale 0: the gradient to the input is exactly 0 at every step
        axes[1].set_ylim(-1, 1)
        axes[1].set_yticks([0])
        axes[1].text(0.5, 0.6, "exactly 0 at every step", transform=axes[1].transAxes, ha="center")
    axes[0].set_ylim(bottom=0)
    for ax, values in ((axes[0], traj.weight_norm), (axes[1], traj.input_grad_norm)):
        # in a corner the curves leave empty: they start at 0 and rise to the right
        ax.text(
            0.97,
            0.04,
            f"{values[0]:g} at step 0",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
        )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_gradient_flow(
    flow, steps: tuple[int, ...] = (0, 1), all_steps: bool = False
) -> plt.Figure:
    """Gradient norm of every trainable parameter of a ControlledBlock at the given updates
    (0-based: 0 is update 1). Exact zeros are drawn as hollow markers on the axis floor.
    ``all_steps``: the axis spans every update of ``flow``, so that one update's bars compare
    with another's."""
    names, groups, per_step = [], [], {s: [] for s in steps}
    for group in ("z2", "theta_c", "z1"):
        for name, norms in getattr(flow, group).items():
            names.append(f"{group}.{name}")
            groups.append(group)
            for s in steps:
                per_step[s].append(norms[s])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    spanned = (
        [v for g in ("z2", "theta_c", "z1") for norms in getattr(flow, g).values() for v in norms]
        if all_steps
        else [v for vals in per_step.values() for v in vals]
    )
    positive = [v for v in spanned if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    width = 0.8 / len(steps)
    for k, s in enumerate(steps):
        xs = [i + (k - (len(steps) - 1) / 2) * width for i in range(len(names))]
        vals = per_step[s]
        ax.bar(xs, [v if v > 0 else 0 for v in vals], width, label=f"update {s + 1}", color=f"C{k}")
        zx = [x for x, v in zip(xs, vals) if v == 0]
        ax.plot(
            zx,
            [floor] * len(zx),
            "o",
            mfc="none",
            color=f"C{k}",
            label=f"update {s + 1}: exactly 0" if zx else None,
        )
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2, top=max(positive) * 3 if positive else 1.0)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("‖∂L/∂θ‖")
    ax.set_title(
        "Where the gradient flows: " + " vs ".join(f"update {s + 1}" for s in steps), fontsize=10
    )
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


def plot_world_conditions(
    batch: dict, conditions: list[str], rows: int = 4, title: str = ""
) -> plt.Figure:
    """The procedural world: each row one sample, its image (in [-1, 1]) then each condition
    (in [0, 1]) of ``batch`` (as ``cnet.world`` datasets' ``batch`` returns it), with the prompt
    as the row's label."""
    columns = ["image", *conditions]
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(1.45 * len(columns) + 2.6, 1.5 * rows), squeeze=False
    )
    for r in range(rows):
        for c, name in enumerate(columns):
            picture = batch[name][r]
            picture = (picture + 1) / 2 if name == "image" else picture
            ax = axes[r, c]
            ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, -1].yaxis.set_label_position("right")
        axes[r, -1].set_ylabel(
            batch["prompt"][r].replace(" with ", "\nwith "),
            fontsize=7,
            rotation=0,
            ha="left",
            va="center",
        )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_generated(
    images, prompts: list[str], columns: int = 6, title: str = "", outlines=None
) -> plt.Figure:
    """Generated images (B, 3, H, W) in [-1, 1] with their prompts; where ``outlines`` (B, H, W)
    is given, each requested outline is drawn over its image in white, to show where the
    shape was asked for."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        ax = axes.flat[i]
        picture = ((image + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy().copy()
        if outlines is not None:
            picture[outlines[i].bool().numpy()] = 1.0
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(prompt.replace(" with ", "\nwith ").replace(" and ", "\nand "), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# long: one diagram of the whole U-Net, drawn block by block
def plot_injection_points(points, condition: str = "", title: str = "") -> plt.Figure:
    """The 12 + 1 places a ControlNet's residuals enter the locked U-Net (ICCV §3.2): one row per
    residual, locked encoder (left) → skip connection → locked decoder (middle) ← Z_i ←
    trainable copy (right); the middle block's residual in the bottom row. ``points`` are
    :class:`cnet.course.injection_points.InjectionPoint`
    (``cnet.course.injection_points.injection_points(unet)``)."""
    import matplotlib.patches as mpatches

    skips, mid = points[:-1], points[-1]
    n = len(skips)
    xs = {"encoder": 0.0, "decoder": 4.6, "copy": 9.2}
    box_w, box_h = 3.0, 0.72
    heights = sorted({p.height for p in points}, reverse=True)
    colour = {
        h: plt.cm.viridis(0.15 + 0.7 * k / max(1, len(heights) - 1)) for k, h in enumerate(heights)
    }
    fig, ax = plt.subplots(figsize=(12.5, 0.62 * (n + 3)))

    def box(x, y, text, face, edge="black", alpha=0.35):
        ax.add_patch(
            mpatches.FancyBboxPatch(
                (x - box_w / 2, y - box_h / 2),
                box_w,
                box_h,
                boxstyle="round,pad=0.02",
                fc=face,
                ec=edge,
                alpha=alpha,
                lw=1,
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5)

    def arrow(x0, x1, y, colour="black", style="-|>"):
        ax.annotate(
            "", xy=(x1, y), xytext=(x0, y), arrowprops=dict(arrowstyle=style, color=colour, lw=1.1)
        )

    def zero_conv(x, y, index):
        ax.text(
            x,
            y,
            f"Z{index}",
            ha="center",
            va="center",
            fontsize=7,
            color="tab:blue",
            bbox=dict(boxstyle="circle,pad=0.25", fc="white", ec="tab:blue", lw=1.2),
        )

    for p in skips:
        y = -p.index
        shape = f"{p.channels}×{p.height}×{p.width}"
        box(xs["encoder"], y, f"{p.encoder}\n{shape}", colour[p.height])
        box(xs["decoder"], y, p.decoder.replace(" (skip)", ""), colour[p.height])
        box(xs["copy"], y, f"{p.encoder} (copy)\n{shape}", "tab:orange")
        arrow(xs["encoder"] + box_w / 2, xs["decoder"] - box_w / 2, y, "gray")
        z_x = (xs["decoder"] + xs["copy"]) / 2
        arrow(xs["copy"] - box_w / 2, z_x + 0.32, y, "tab:blue")
        zero_conv(z_x, y, p.index)
        arrow(z_x - 0.32, xs["decoder"] + box_w / 2, y, "tab:blue")
        ax.text(xs["decoder"] + box_w / 2 + 0.12, y + 0.18, "+", fontsize=10, color="tab:blue")
    y = -(n + 0.6)
    shape = f"{mid.channels}×{mid.height}×{mid.width}"
    locked_mid_x = (xs["encoder"] + xs["decoder"]) / 2
    box(locked_mid_x, y, f"mid_block (locked)\n{shape}", colour[mid.height])
    box(xs["copy"], y, f"mid_block (copy)\n{shape}", "tab:orange")
    z_x = (xs["decoder"] + xs["copy"]) / 2
    arrow(xs["copy"] - box_w / 2, z_x + 0.32, y, "tab:blue")
    zero_conv(z_x, y, mid.index)
    arrow(z_x - 0.32, locked_mid_x + box_w / 2, y, "tab:blue")
    ax.text(locked_mid_x + box_w / 2 + 0.12, y + 0.18, "+", fontsize=10, color="tab:blue")
    top = 1.25
    for key, label in (
        ("encoder", "locked encoder\n(source of each skip)"),
        ("decoder", "locked decoder\n(skip + Z_i(copy), Eq. 2)"),
        ("copy", "ControlNet: trainable copy"),
    ):
        ax.text(xs[key], top, label, ha="center", va="bottom", fontsize=9, weight="bold")
    if condition:
        ax.text(
            xs["copy"],
            top - 0.35,
            condition,
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="tab:orange",
        )
    ax.set_xlim(xs["encoder"] - box_w / 2 - 0.2, xs["copy"] + box_w / 2 + 0.2)
    ax.set_ylim(-(n + 1.3), top + 0.9)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_guess_mode_scales(scales: dict, title: str = "") -> plt.Figure:
    """Per-residual control scales, one line per rule (e.g. the released 0.825^(12−i) and
    diffusers' logspace) on a log axis; the last residual is the middle block's. With several
    rules, a second panel shows each one's difference from the first, in percent."""
    rules = {label: list(values) for label, values in scales.items()}
    first = next(iter(rules.values()))
    n = len(first)
    ticks = [str(i) for i in range(n - 1)] + ["mid"]
    panels = 2 if len(rules) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.4), squeeze=False)
    ax = axes[0, 0]
    for (label, values), marker in zip(rules.items(), "os^dv"):
        ax.plot(range(n), values, marker + "-", ms=4, label=label)
    ax.set_yscale("log")
    for level in (0.1, 1.0):
        ax.axhline(level, color="gray", lw=0.6, ls=":")
    ax.set_ylabel("scale s_i")
    ax.set_title(title or "Guess mode: shallow residuals damped, deep ones kept", fontsize=10)
    ax.legend(fontsize=8)
    if panels == 2:
        diff_ax = axes[0, 1]
        for (label, values), marker in list(zip(rules.items(), "os^dv"))[1:]:
            diff_ax.plot(
                range(n),
                [100 * (v / f - 1) for v, f in zip(values, first)],
                marker + "-",
                ms=4,
                label=label,
                color="tab:orange",
            )
        diff_ax.axhline(0, color="gray", lw=0.6)
        diff_ax.set_ylabel(f"% difference from '{next(iter(rules))}'")
        diff_ax.set_title("How far apart the rules are", fontsize=10)
        diff_ax.legend(fontsize=8)
    for a in axes[0]:
        a.set_xticks(range(n), ticks)
        a.set_xlabel("residual i (shallow → deep, then mid)")
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
