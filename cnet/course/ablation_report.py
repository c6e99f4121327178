"""The ablations' summary (:func:`cnet.experiments.ablate.summarize`) in words: the one table
(README, notebook 07) and, per study, each variant against its reference seed by seed, judged
by the ledger's rule (:mod:`cnet.experiments.ledger`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..experiments.ablate import RUN_MEASURES, VARIANTS, ablation_config, summarize
from ..experiments.first_updates import first_updates
from ..experiments.ledger import claim_ledger, paired
from ..experiments.recipe import collapsed
from .ablation_plots import LABELS

__all__ = [
    "ablation_table",
    "effects",
    "format_spread",
    "step_time_table",
    "summarize_ablations",
]

#: The variants whose step is timed side by side for the summary (bench's ``variant_cost``).
TIMED_VARIANTS = ("default", "gaussian", "none", "lite", "accum-2")

MEASURES = {
    "onset": "onset step",
    "t50": "50 % step",
    "final_iou": "final IoU",
    "final_colours_ok": "final colour accuracy",
    "prompt_free_layout_iou": "prompt-free layout IoU",
    "step0_iou": "step-0 IoU",
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
    side, :func:`cnet.bench.suites.variant_cost`; — where not measured), the seeds with an
    onset, the final IoU of each seed (seed 0 first), prompt-free layout IoU (mean ± sd), and
    how many seeds collapsed (:func:`cnet.experiments.recipe.collapsed`) and diverged
    (:func:`cnet.experiments.ablate.diverged_at`)."""
    ratios = result.get("step_time", {}).get("time_ratio", {})
    lines = [
        "| variant | trainable parameters | step time | onset | final IoU per seed "
        "| prompt-free layout IoU | collapsed | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, variant in result["variants"].items():
        stats, runs = variant["aggregate"], variant["runs"]
        ratio = f"{ratios[name]:.2f}×" if name in ratios else "—"
        finals = " / ".join(f"{r['final']['iou']:.2f}" for r in runs)
        fell = sum(collapsed(r["curves"]["iou"]) for r in runs)
        lines.append(
            f"| {LABELS.get(name, name)} | {variant['trainable_parameters'] / 1e6:.2f}M | {ratio} "
            f"| {stats['onset']['n']} of {stats['onset']['of']} | {finals} "
            f"| {format_spread(stats['prompt_free_layout_iou'])} "
            f"| {fell} of {len(runs)} "
            f"| {stats['diverged_at']['n']} of {stats['diverged_at']['of']} |"
        )
    return "\n".join(lines)


def effects(result: dict, study: str, measures=tuple(MEASURES)) -> list[str]:
    """One line per variant of ``study`` and measure, against the study's reference, seed by
    seed (:func:`cnet.experiments.ledger.paired`): the means, the mean paired difference with
    its 95 % bootstrap interval, on how many seeds the variant is higher and lower, and the
    ledger's rule: "lower on every seed", "higher on every seed", or "undecided". For the
    onset, which a run without one lacks, the seeds with one on each side and the steps."""
    reference = result["studies"][study]["reference"]
    if reference is None:
        return []
    lines = []
    for variant in result["studies"][study]["variants"]:
        if variant == reference:
            continue
        name = LABELS.get(variant, variant)
        for key in measures:
            value = RUN_MEASURES[key]
            if key == "onset":
                mine, theirs = (
                    [value(r) for r in result["variants"][v]["runs"]] for v in (variant, reference)
                )
                have = [sum(o is not None for o in x) for x in (mine, theirs)]
                steps = ["/".join("–" if o is None else str(o) for o in x) for x in (mine, theirs)]
                lines.append(
                    f"{name}: onset on {have[0]} of {len(mine)} seeds ({steps[0]}) vs "
                    f"{have[1]} of {len(theirs)} ({steps[1]})"
                )
                continue
            c = paired(result, variant, reference, value)
            n = len(c["differences"])
            if not n:
                continue
            verdict = (
                "lower on every seed"
                if c["lower"] == n
                else "higher on every seed"
                if c["higher"] == n
                else "undecided"
            )
            mean = [result["variants"][v]["aggregate"][key]["mean"] for v in (variant, reference)]
            low, high = c["interval"]
            lines.append(
                f"{name}: {MEASURES[key]} {mean[0]:.2f} vs {mean[1]:.2f}; paired "
                f"{c['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}], higher on "
                f"{c['higher']} of {n} seeds, lower on {c['lower']}: {verdict}"
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


def summarize_ablations(
    studies: Sequence[str],
    seeds: Sequence[int],
    root: str | Path = "runs/ablate",
    step_time: dict | None = None,
    command: str = "",
) -> dict:
    """The summary notebook 07 reads (``python -m cnet ablate``): every study's finished runs
    (:func:`cnet.experiments.ablate.summarize`), the first updates, the ledger's verdicts
    (:func:`cnet.experiments.ledger.claim_ledger`) and the variants' step times, timed side by
    side now (bench's ``variant_cost``, 7 repeats) unless ``step_time`` gives an earlier
    summary's. Here, above both the experiments and bench, because it joins them."""
    from ..bench.suites import variant_cost

    settings = ablation_config("default", 0, root)
    if step_time is None:
        step_time = variant_cost(settings, {v: VARIANTS[v] for v in TIMED_VARIANTS}, repeats=7)
        step_time.pop("times_s")
    result = summarize(studies, seeds, root, step_time, first_updates(settings), command=command)
    result["ledger"] = claim_ledger(result)
    return result
