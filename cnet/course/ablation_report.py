"""The ablations' summary (:func:`cnet.experiments.ablate.summarize`) in words: the one table
(README, notebook 07) and, per study, what each variant changes beyond the seed spread and what it
does not."""

from __future__ import annotations

from ..experiments.ablate import differs
from .ablation_plots import LABELS

__all__ = ["ablation_table", "effects", "format_spread", "step_time_table"]

MEASURES = {
    "onset": "onset step",
    "t50": "50 % step",
    "final_iou": "final IoU",
    "final_colours_ok": "final colour accuracy",
    "prompt_free_layout_iou": "prompt-free layout IoU",
    "step0_deviation": "step-0 deviation",
    "step0_colours_ok": "step-0 colour accuracy",
    "copy_drift": "copy drift",
}


def format_spread(stats: dict, digits: int = 2, counts: bool = False) -> str:
    """``mean ± sd`` over the seeds that have a value (``—`` where none has); ``counts`` adds
    how many of them do, e.g. ``275 ± 35 (2/3)``."""
    if not stats.get("n"):
        return "—" + (f" (0/{stats['of']})" if counts else "")
    sd = "" if stats["sd"] is None else f" ± {stats['sd']:.{digits}f}"
    text = f"{stats['mean']:.{digits}f}{sd}"
    return text + (f" ({stats['n']}/{stats['of']})" if counts else "")


def ablation_table(result: dict) -> str:
    """Variant, trainable parameters, step time against the ControlNet's (measured side by
    side, :func:`cnet.bench.suites.variant_cost`; — where not measured), onset (mean ± sd, and
    how many seeds left the step-0 band), final IoU and prompt-free layout IoU (mean ± sd), and
    how many seeds diverged (:func:`cnet.experiments.ablate.diverged_at`)."""
    ratios = result.get("step_time", {}).get("time_ratio", {})
    lines = [
        "| variant | trainable parameters | step time | onset step (seeds with one) "
        "| final IoU | prompt-free layout IoU | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, variant in result["variants"].items():
        stats = variant["aggregate"]
        ratio = f"{ratios[name]:.2f}×" if name in ratios else "—"
        lines.append(
            f"| {LABELS.get(name, name)} | {variant['trainable_parameters'] / 1e6:.2f}M | {ratio} "
            f"| {format_spread(stats['onset'], 0, counts=True)} "
            f"| {format_spread(stats['final_iou'])} "
            f"| {format_spread(stats['prompt_free_layout_iou'])} "
            f"| {stats['diverged_at']['n']}/{stats['diverged_at']['of']} |"
        )
    return "\n".join(lines)


def effects(result: dict, study: str, measures=tuple(MEASURES)) -> list[str]:
    """One line per variant of ``study`` and measure, against the study's reference (the
    default ControlNet at the same number of steps): higher or lower
    where the seeds' ranges do not overlap (:func:`cnet.experiments.ablate.differs`), "within the
    seed spread" where they do, and how many seeds have a value where not all do (a run with
    no onset)."""
    reference = result["studies"][study]["reference"]
    if reference is None:
        return []
    default = result["variants"][reference]["aggregate"]
    lines = []
    for variant in result["studies"][study]["variants"]:
        if variant == reference:
            continue
        stats = result["variants"][variant]["aggregate"]
        for key in measures:
            a, b = stats[key], default[key]
            if not a.get("n") and not b.get("n"):
                continue
            complete = a["n"] == a["of"] and b["n"] == b["of"]
            if differs(a, b):
                verdict = "higher" if a["mean"] > b["mean"] else "lower"
                verdict += ", beyond the seed spread"
            elif complete:
                verdict = "within the seed spread"
            else:
                verdict = "not every seed has one: no verdict"
            digits = 0 if key in ("onset", "t50") else 2
            lines.append(
                f"{LABELS.get(variant, variant)}: {MEASURES[key]} "
                f"{format_spread(a, digits, not complete)} vs "
                f"{format_spread(b, digits, not complete)}: {verdict}"
            )
    return lines


def step_time_table(result: dict) -> str:
    """The ablations' step times (median ms, ratio to the ControlNet's) and trainable
    parameters, as bench/README.md quotes them."""
    step = result["step_time"]
    lines = [
        "| variant | trainable parameters | step (median) | against the ControlNet |",
        "|---|---|---|---|",
    ]
    for name, ratio in step["time_ratio"].items():
        parameters = step["trainable_parameters"][name] / 1e6
        lines.append(
            f"| {LABELS.get(name, name)} | {parameters:.2f}M "
            f"| {step['step_ms'][name]:.0f} ms | {ratio:.2f}× |"
        )
    return "\n".join(lines)
