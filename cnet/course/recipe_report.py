"""The recipe study (:func:`cnet.experiments.recipe.recipe_study`) in one table, for the README and
notebook 05: per recipe and seed set, how many seeds started following their condition, how
many collapsed when continued to twice their steps, and the spread of their final fidelity."""

from __future__ import annotations

__all__ = ["profile_table", "recipe_table", "seed_list"]


def seed_list(seeds: list[int]) -> str:
    """Seeds as a range where they run without a gap (``0–9``), else one by one (``3, 5, 6``)."""
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _row(name: str, recipe: dict, where: str) -> str:
    runs = recipe["runs"]
    onsets = sorted(r["onset"] for r in runs if r["onset"] is not None)
    onset = (
        (f"{onsets[0]}–{onsets[-1]}" if onsets[0] != onsets[-1] else str(onsets[0]))
        if onsets
        else "—"
    )
    final = recipe["final_iou"]
    longer = recipe["final_iou_2x"]
    final_2x = (
        f"{longer['median']:.2f} ({longer['min']:.2f}–{longer['max']:.2f})" if longer else "—"
    )
    wall = recipe["wall_time_s"]  # None where no seed has a separate run to the budget
    time = f"{wall['median']:.0f}" if wall else "—"
    collapsed = f"{recipe['collapses_2x']}/{recipe['n_2x']}" if recipe["n_2x"] else "not continued"
    return (
        f"| {name} | {runs[0]['steps']} | {where} | {recipe['onsets']}/{recipe['n']} | {onset} "
        f"| {final['median']:.4f} ({final['min']:.2f}–{final['max']:.2f}) "
        f"| {collapsed} | {final_2x} "
        f"| {time} |"
    )


def recipe_table(result: dict) -> str:
    """One row per recipe of the study (and the check of the chosen one): its budget in updates,
    seeds with an onset (k/n) and the range of their onset steps, the final IoU at the budget
    (median to four places, so that a median just short of a round target reads so; min–max),
    collapses when continued to 2× (k of the seeds continued), the final IoU at 2×, and the
    median training time of a run to the budget (s; on the machine and threads its runs
    record)."""
    lines = _header()
    parts = [(result, "study")] + ([(result["check"], "check")] if "check" in result else [])
    for part, kind in parts:
        for name, recipe in part["recipes"].items():
            devices = sorted({r["device"] for r in recipe["runs"]})
            seeds = recipe["seeds"]
            where = f"seeds {seed_list(seeds)}, {', '.join(devices)}"
            chosen = kind == "check" and name == result["chosen"]["recipe"]
            lines.append(_row(name + (" (chosen)" if chosen else ""), recipe, where))
    return "\n".join(lines)


def _header() -> list[str]:
    return [
        "| recipe | steps | runs | onset | onset steps | final IoU, median (range) "
        "| collapsed at 2× | final IoU at 2× | training time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]


def profile_table(result: dict) -> str:
    """A profile checked over seeds (:func:`cnet.experiments.profiles.profile_check`) in
    :func:`recipe_table`'s columns, one row."""
    devices = sorted({r["device"] for r in result["runs"]})
    where = f"seeds {seed_list(result['seeds'])}, {', '.join(devices)}"
    return "\n".join([*_header(), _row(f"{result['profile']} profile", result, where)])
