"""The figures of the benchmarks, drawn from their results (nothing here measures)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["draw", "workload_label"]

# The paper's figures for a ControlNet step against fine-tuning SD (§3.2, one A100 40 GB).
PAPER_TIME_RATIO, PAPER_MEMORY_RATIO = 1.34, 1.23


def workload_label(workload: dict) -> str:
    if workload["unet"] == "miniature":
        name = "miniature base"
    else:
        width = workload["width"]
        name = "SD1.5" if width == 1 else f"SD1.5 × {width:g} width"
    size = workload.get("latent_size") or workload["resolution"] // 8
    return f"{name}\n{8 * size} px, batch {workload['batch']}"


def _step_cost(results: list[dict], plan: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [workload_label(r["workload"]) for r in results]
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in results], 0.4, label="time")
    ax.bar([i + 0.2 for i in x], [r["memory_ratio"] for r in results], 0.4,
           label="peak tensor memory")
    ax.axhline(PAPER_TIME_RATIO, color="C0", ls="--", lw=1, label="paper: time 1.34×")
    ax.axhline(PAPER_MEMORY_RATIO, color="C1", ls="--", lw=1, label="paper: memory 1.23×")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("ControlNet step / fine-tuning step")
    ax.set_title(f"ControlNet against fine-tuning the U-Net ({plan} bench)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _loop_cost(results: list[dict], plan: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [workload_label(r["workload"]) for r in results]
    x = range(len(results))
    for offset, key, text in ((-0.2, "cached", "cnet: latents and text cached"),
                              (0.2, "per_step_encoding", "VAE + text encoder every step")):
        ax.bar([i + offset for i in x], [r["samples_per_s"][key] for r in results], 0.4,
               label=text)
    for i, r in enumerate(results):
        ax.text(i, max(r["samples_per_s"].values()), f"{r['speedup']:.2f}×", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("training samples / s")
    ax.set_yscale("log")
    ax.set_title(f"Caching the frozen work ({plan} bench)", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _scaling(result: dict, plan: str) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, xlabel in ((axes[0], "batch", "batch size"),
                            (axes[1], "latent_size", "image size (px)")):
        part = result[key]
        sizes = part["sizes"] if key == "batch" else [8 * s for s in part["sizes"]]
        ax.plot(sizes, part["relative"], "o-", label="measured")
        ax.plot(sizes, [s / sizes[0] for s in sizes] if key == "batch"
                else [(s / sizes[0]) ** 2 for s in sizes], ":", color="gray",
                label="linear in batch" if key == "batch" else "linear in pixels")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time / first point's")
        ax.legend(fontsize=7)
    fig.suptitle(f"ControlNet step time, {workload_label(result['workload'])} ({plan} bench)"
                 .replace("\n", ", "), fontsize=9)
    fig.tight_layout()
    return fig


def draw(name: str, result, plan: str) -> Figure | None:
    """The figure of one suite's result (``loop_overheads`` has none: two numbers)."""
    drawers = {"step_cost": _step_cost, "loop_cost": _loop_cost, "scaling": _scaling}
    if name not in drawers:
        return None
    fig = drawers[name](result, plan)
    return fig
