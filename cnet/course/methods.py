"""The methods comparison (:mod:`cnet.experiments.methods`) in words and pictures: the table
(README, notebook 08), each method against ControlNet seed by seed by the ledger's rule
(:mod:`cnet.experiments.ledger`), the per-seed curves and the samples on the same conditions."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from safetensors.torch import load_file

from ..experiments.ledger import paired_runs
from ..experiments.methods import RUN_MEASURES, equal_time_runs, method_config
from ..train.runs import read_config
from .ablation_report import format_spread
from .figures import conditions_the_base_misses, save_figure
from .training_plots import outline_region

__all__ = [
    "LABELS",
    "contrast_table",
    "equal_time_contrasts",
    "equal_time_table",
    "method_contrasts",
    "methods_table",
    "plot_equal_time_curves",
    "plot_method_curves",
    "plot_parameter_roles",
    "plot_method_samples",
    "write_method_figures",
]

LABELS = {
    "controlnet": "ControlNet",
    "controlnet-lite": "ControlNet-lite",
    "t2i-adapter": "T2I-Adapter",
    "controlnet-xs": "ControlNet-XS",
    "concat": "concatenation",
}
#: The measures each method is compared with ControlNet on, and which way is better.
CONTRASTED = {
    "final_iou": ("final IoU", +1),
    "prompt_free_layout_iou": ("layout IoU, empty prompt", +1),
    "transfer_iou": ("IoU on the fine-tune", +1),
    "composition_change": ("layout IoU change, composed", +1),
    "onset": ("onset step", -1),
}
_DIGITS = {"onset": 0}  # steps: whole numbers; IoUs: three decimals
_COLOURS = dict(zip(LABELS, plt.get_cmap("tab10").colors, strict=False))


def _cost(result: dict, name: str) -> str:
    cost = result.get("cost")
    if not cost or name not in cost["step_time_ratio"]:
        return "| | |"
    return (
        f"| {cost['step_time_ratio'][name]:.2f}× | {cost['memory_ratio'][name]:.2f}× "
        f"| {cost['sampling_ratio'][name]:.2f}× |"
    )


def _kept(value: float | None) -> str:
    if value is None:
        return "–"
    return "exactly" if value == 0.0 else f"no ({value:.1e})"


def _at_weight_0(name: str, value: float) -> str:
    if name == "concat":  # no weight: its condition's latent at zero
        return f"no weight; condition at 0: {_kept(value)}"
    return _kept(value)


def _composed(aggregate: dict) -> str:
    change, second = aggregate["composition_change"], aggregate["second_control_iou"]
    if change["n"] == change["of"]:
        return f"{change['mean']:+.2f} ({change['min']:+.2f} to {change['max']:+.2f})"
    if second["n"]:  # measured, but the second control did not learn on every seed
        return (
            f"second control started on {change['n']} of {change['of']} seeds "
            f"(IoU {second['min']:.2f}–{second['max']:.2f})"
        )
    return "–"


def methods_table(result: dict) -> str:
    """One row per method: trainable parameters; onsets (k of n seeds, mean step); final
    fidelity and prompt-free layout IoU (mean ± sd over seeds, :func:`format_spread`); whether
    the base is kept exactly before any update and at weight 0 on every seed (where not, the
    largest deviation over seeds); fidelity on the fine-tuned base (mean ± sd);
    the change of each object's layout IoU when a second control acts at once (mean and range
    over seeds); and, where the bench measured them, step time, peak memory and sampling time
    as ratios."""
    rows = [
        "| method | trains | onset | final IoU | layout IoU, no prompt | base kept at init "
        "| at weight 0 | on the fine-tune | composed | step time | step memory | sampling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["methods"].items():
        a = entry["aggregate"]
        worst = {
            k: max(r[k] for r in entry["runs"])
            for k in ("deviation_at_init", "deviation_at_weight_0")
        }
        onset = a["onset"]
        rows.append(
            f"| {LABELS[name]} | {entry['trainable_parameters'] / 1e6:.2f}M "
            f"| {onset['n']} of {onset['of']}"
            + (f", step {onset['mean']:.0f}" if onset["n"] else "")
            + f" | {format_spread(a['final_iou'])} "
            f"| {format_spread(a['prompt_free_layout_iou'])} "
            f"| {_kept(worst['deviation_at_init'])} "
            f"| {_at_weight_0(name, worst['deviation_at_weight_0'])} "
            f"| {format_spread(a['transfer_iou']) if a['transfer_iou']['n'] else '–'} "
            f"| {_composed(a)} " + _cost(result, name)
        )
    return "\n".join(rows)


def method_contrasts(
    result: dict, reference: str = "controlnet", measures: dict | None = None
) -> list[dict]:
    """Each method against ``reference``, seed by seed, on each of ``measures`` (default
    :data:`CONTRASTED`): the
    paired differences, their mean and 95 % bootstrap interval, and the ledger's direction rule
    (better or worse on every seed, else undecided; with n seeds a verdict by chance has
    probability 2 · 2^-n)."""
    rows = []
    other = result["methods"][reference]["runs"]
    for name, entry in result["methods"].items():
        if name == reference:
            continue
        for measure, (label, sign) in (measures or CONTRASTED).items():
            comparison = paired_runs(entry["runs"], other, RUN_MEASURES[measure])
            n = len(comparison["differences"])
            row = {"method": name, "measure": measure, "label": label, "n": n}
            row |= {k: v for k, v in comparison.items() if k != "seeds"}
            if n:
                better = comparison["higher" if sign > 0 else "lower"]
                worse = comparison["lower" if sign > 0 else "higher"]
                row["verdict"] = "better" if better == n else "worse" if worse == n else "undecided"
            else:
                row["verdict"] = "not measured"
            rows.append(row)
    return rows


def contrast_table(rows: list[dict], reference: str = "ControlNet") -> str:
    """:func:`method_contrasts` as a table."""
    lines = [
        f"| method | measure | mean difference from {reference} [95 % interval] | seeds "
        "higher / lower | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["n"]:
            lines.append(f"| {LABELS[r['method']]} | {r['label']} | – | – | {r['verdict']} |")
            continue
        low, high = r["interval"]
        d = _DIGITS.get(r["measure"], 3)
        lines.append(
            f"| {LABELS[r['method']]} | {r['label']} | {r['mean_difference']:+.{d}f} "
            f"[{low:+.{d}f}, {high:+.{d}f}] | {r['higher']} / {r['lower']} of {r['n']} "
            f"| {r['verdict']} |"
        )
    return "\n".join(lines)


#: What the equal-wall-time arm compares: fidelity (its onsets count other updates).
TIME_CONTRASTED = {
    k: CONTRASTED[k] for k in ("final_iou", "prompt_free_layout_iou", "transfer_iou")
}


def equal_time_contrasts(result: dict) -> list[dict]:
    """:func:`method_contrasts` on the equal-wall-time arm
    (:func:`cnet.experiments.methods.equal_time_runs`), on its fidelity measures; a method whose
    arm is its own runs is not repeated."""
    arm = equal_time_runs(result)
    rows = method_contrasts(arm, measures=TIME_CONTRASTED)
    same = {n for n, e in result["equal_time"]["methods"].items() if e.get("same_runs")}
    return [r for r in rows if r["method"] not in same]


def equal_time_table(result: dict) -> str:
    """One row per method of the equal-wall-time arm: its updates, the bench's step-time ratio
    and the time its updates take at the bench's step time (the budget: equal to within the
    rounding of the updates to the evaluation interval),
    the runs' own wall time (mean and range over seeds: evaluations included, and whatever else
    the machine ran), onsets, final fidelity and prompt-free layout IoU (mean ± sd over seeds),
    and its final IoU against its own 800-update runs seed by seed (mean difference, seeds
    higher of n)."""
    arm, steps, cost = equal_time_runs(result), result["equal_time"]["steps"], result["cost"]
    rows = [
        "| method | updates | step time | updates × bench step (s) | run wall time (s) | onset "
        "| final IoU | layout IoU, no prompt | final IoU vs its own at equal samples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in arm["methods"].items():
        a, own = entry["aggregate"], result["methods"][name]
        time = a["wall_time_s"]
        onset = a["onset"]
        if entry is own:
            versus = "the same runs"
        else:
            c = paired_runs(entry["runs"], own["runs"], RUN_MEASURES["final_iou"])
            versus = f"{c['mean_difference']:+.3f}, higher on {c['higher']} of {len(c['seeds'])}"
        rows.append(
            f"| {LABELS[name]} | {steps[name]} "
            f"| {cost['step_time_ratio'][name]:.2f}× "
            f"| {steps[name] * cost['step_ms'][name] / 1000:.0f} "
            f"| {time['mean']:.0f} ({time['min']:.0f}–{time['max']:.0f}) "
            f"| {onset['n']} of {onset['of']}"
            + (f", step {onset['mean']:.0f}" if onset["n"] else "")
            + f" | {format_spread(a['final_iou'])} "
            f"| {format_spread(a['prompt_free_layout_iou'])} | {versus} |"
        )
    return "\n".join(rows)


ROLE_STYLE = {  # parameter_roles' keys: label and colour
    "locked": ("locked base U-Net (runs unchanged)", "0.75"),
    "copied": ("trained, starts as the base's weights", "tab:blue"),
    "zero": ("trained, starts at exactly zero", "tab:green"),
    "random": ("trained, starts random", "tab:orange"),
}


def plot_parameter_roles(roles: dict[str, dict]) -> plt.Figure:
    """One bar per method (``roles``: name → :func:`cnet.experiments.methods.parameter_roles`):
    the U-Net weights it locks and what it trains, by where each weight starts (millions of
    entries; the zero share labelled, being small)."""
    names = list(roles)
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.2))
    for y, name in enumerate(names):
        left = 0.0
        for role, (label, colour) in ROLE_STYLE.items():
            width = roles[name][role] / 1e6
            ax.barh(y, width, left=left, color=colour, label=label if y == 0 else None)
            left += width
        zero = roles[name]["zero"]
        ax.text(left + 0.05, y, f"{zero:,} zero" if zero else "none zero", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [LABELS[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("weights (millions of entries)")
    ax.set_xlim(0, 1.25 * max(sum(r.values()) for r in roles.values()) / 1e6)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax.set_title("What each method locks and trains on the miniature base", fontsize=10)
    fig.tight_layout()
    return fig


def plot_method_curves(result: dict) -> plt.Figure:
    """Fidelity against training step, one panel per method, one line per seed, the locked
    base's fidelity on each seed's evaluation set dotted."""
    names = list(result["methods"])
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.6 * len(names), 2.8), sharey=True, squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        for run in result["methods"][name]["runs"]:
            curves = run["curves"]
            ax.plot(curves["eval_steps"], curves["iou"], color=_COLOURS[name], alpha=0.8)
            ax.axhline(run["base_iou"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xlabel("training step", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("IoU (evaluation set)", fontsize=9)
    seeds = ", ".join(str(s) for s in result["seeds"])
    fig.suptitle(
        f"Each method on the same base, data and schedule: one line per seed ({seeds}); "
        "dotted: the locked base",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_equal_time_curves(result: dict) -> plt.Figure:
    """Fidelity against training time, the time being each method's updates times its step
    time from the bench (``method_cost``, one run, so the methods' times are comparable): one
    panel per method other than ControlNet, its equal-wall-time runs coloured, ControlNet's
    runs grey, one line per seed."""
    arm, cost = equal_time_runs(result), result["cost"]
    names = [n for n in arm["methods"] if n != "controlnet"]
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.8 * len(names), 3.4), sharey=True, squeeze=False
    )

    def draw(ax, name, colour, label):
        for i, run in enumerate(arm["methods"][name]["runs"]):
            seconds = [s * cost["step_ms"][name] / 1000 for s in run["curves"]["eval_steps"]]
            ax.plot(
                seconds,
                run["curves"]["iou"],
                color=colour,
                alpha=0.8,
                label=label if i == 0 else None,
            )

    for ax, name in zip(axes[0], names, strict=True):
        draw(ax, "controlnet", "0.6", LABELS["controlnet"])
        draw(ax, name, _COLOURS[name], f"{LABELS[name]}, {arm['steps'][name]} updates")
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xlabel("training time (s, bench step time)", fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("IoU (evaluation set)", fontsize=9)
    fig.suptitle(
        "Each method for the training time of ControlNet's 800 updates (updates × the bench's "
        "step time): one line per seed",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_method_samples(result: dict, root: str | Path, seed: int = 0, rows: int = 5):
    """The last evaluation's samples of every method's run of ``seed`` on the same conditions
    (the ``rows`` the locked base followed worst), the base's beside them, each condition's
    region outlined (None where a run's folder is not here)."""
    names = list(result["methods"])
    folders = [Path(method_config(name, seed, root).out) for name in names]
    if not all((f / "samples.safetensors").exists() for f in folders):
        return None
    samples = {n: load_file(f / "samples.safetensors") for n, f in zip(names, folders, strict=True)}
    first = samples[names[0]]
    conditions, regions, ranked = conditions_the_base_misses(
        read_config(folders[0]), first["step_0"]
    )
    picked = ranked[:rows]
    columns = [("condition", None), ("locked base", first["step_0"])]
    columns += [(LABELS[n], samples[n][f"step_{max(_steps(samples[n]))}"]) for n in names]
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(1.3 * len(columns), 1.3 * rows), squeeze=False
    )
    for c, (title, images) in enumerate(columns):
        axes[0, c].set_title(title, fontsize=8)
        for r, i in enumerate(picked):
            ax = axes[r, c]
            shown = conditions[i] if images is None else images[i]
            ax.imshow(shown.permute(1, 2, 0).numpy())
            if images is not None:
                outline_region(ax, regions[i], antialiased=False)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"Seed {seed}, after training: the same conditions and sampling seeds for every method "
        "(dashed: the region asked for)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _steps(samples: dict) -> list[int]:
    return [int(k.split("_")[1]) for k in samples]


def write_method_figures(result: dict, folder: str | Path, root: str | Path) -> list[Path]:
    """The comparison's figures, as ``08_*.png`` in ``folder``."""
    written = [save_figure(plot_method_curves(result), "08_method_curves", folder, dpi=90)]
    if result.get("equal_time") and len(equal_time_runs(result)["methods"]) > 1:
        figure = plot_equal_time_curves(result)
        written.append(save_figure(figure, "08_equal_time_curves", folder, dpi=90))
    grid = plot_method_samples(result, root)
    if grid is not None:
        written.append(save_figure(grid, "08_method_samples", folder, dpi=90))
    plt.close("all")
    return written
