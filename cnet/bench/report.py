"""The figures of the benchmarks, drawn from their results (nothing here measures)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["draw", "tables", "workload_label"]

# The paper's figures for a ControlNet step against fine-tuning SD (ICCV §3.2, one A100 40 GB).
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
    ax.bar(
        [i + 0.2 for i in x], [r["memory_ratio"] for r in results], 0.4, label="peak tensor memory"
    )
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
    for offset, key, text in (
        (-0.2, "cached", "cnet: latents and text cached"),
        (0.2, "per_step_encoding", "VAE + text encoder every step"),
    ):
        ax.bar([i + offset for i in x], [r["samples_per_s"][key] for r in results], 0.4, label=text)
    for i, r in enumerate(results):
        ax.text(
            i,
            max(r["samples_per_s"].values()),
            f"{r['speedup']:.2f}×",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("training samples / s")
    ax.set_yscale("log")
    ax.set_title(f"Caching the frozen work ({plan} bench)", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _scaling(result: dict, plan: str) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    workload = result["workload"]
    for ax, key, xlabel, fixed in (
        (axes[0], "batch", "batch size", f"at {8 * workload['latent_size']} px"),
        (axes[1], "latent_size", "image size (px)", f"at batch {workload['batch']}"),
    ):
        ax.set_title(fixed, fontsize=8)
        part = result[key]
        sizes = part["sizes"] if key == "batch" else [8 * s for s in part["sizes"]]
        ax.plot(sizes, part["relative"], "o-", label="measured")
        ax.plot(
            sizes,
            [s / sizes[0] for s in sizes]
            if key == "batch"
            else [(s / sizes[0]) ** 2 for s in sizes],
            ":",
            color="gray",
            label="linear in batch" if key == "batch" else "linear in pixels",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time / first point's")
        ax.legend(fontsize=7)
    name = workload_label(workload).split("\n")[0]
    fig.suptitle(f"ControlNet step time, {name} ({plan} bench)", fontsize=9)
    fig.tight_layout()
    return fig


def draw(name: str, result, plan: str) -> Figure | None:
    """The figure of one suite's result (``loop_overheads`` has none: two numbers)."""
    drawers = {"step_cost": _step_cost, "loop_cost": _loop_cost, "scaling": _scaling}
    if name not in drawers:
        return None
    fig = drawers[name](result, plan)
    return fig


def _x(value: float) -> str:
    return f"{value:.2f}×"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def tables(results: dict[str, dict]) -> dict[str, str]:
    """The README's tables, written from the results' JSON (``{suite: record}``), so that what
    the README quotes is what was measured."""
    out = {}
    rows = [
        "| U-Net | parameters | ControlNet trains | step time | peak memory | time ratio "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["step_cost"]["results"]:
        rows.append(
            f"| {workload_label(r['workload']).replace(chr(10), ', ')} "
            f"| {r['unet_parameters'] / 1e6:.1f}M "
            f"| {r['trainable_parameters']['controlnet'] / 1e6:.1f}M "
            f"| {r['step_ms']['controlnet']:.0f} / {r['step_ms']['finetune']:.0f} ms "
            f"| {_mib(r['peak_bytes']['controlnet'])} / {_mib(r['peak_bytes']['finetune'])} "
            f"| **{_x(r['time_ratio'])}** | **{_x(r['memory_ratio'])}** |"
        )
    rows.append(
        "| paper, ICCV §3.2 (SD1.5, one A100 40 GB; parameters counted from "
        "diffusers' classes) | 859.5M | 361.3M | | | 1.34× | 1.23× |"
    )
    out["step_cost"] = "\n".join(rows)
    rows = [
        "| model | cached | VAE + text encoder every step | encoding alone | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in results["loop_cost"]["results"]:
        rows.append(
            f"| {workload_label(r['workload']).replace(chr(10), ', ')} "
            f"| {r['samples_per_s']['cached']:.3g} samples/s "
            f"| {r['samples_per_s']['per_step_encoding']:.3g} samples/s "
            f"| {r['encode_ms']:.0f} ms | **{_x(r['speedup'])}** |"
        )
    out["loop_cost"] = "\n".join(rows)
    s = results["scaling"]["results"]
    name = workload_label(s["workload"]).split("\n")[0]
    out["scaling"] = "\n".join(
        [
            f"| {name}, ControlNet step | "
            + " | ".join(str(b) for b in s["batch"]["sizes"])
            + " |",
            "|---|" + "---|" * len(s["batch"]["sizes"]),
            f"| time vs batch size, at {8 * s['workload']['latent_size']} px | "
            + " | ".join(_x(v) for v in s["batch"]["relative"])
            + " |",
            "| image size (px) | "
            + " | ".join(str(8 * v) for v in s["latent_size"]["sizes"])
            + " |",
            f"| time vs image size, at batch {s['workload']['batch']} | "
            + " | ".join(_x(v) for v in s["latent_size"]["relative"])
            + " |",
        ]
    )
    o = results["loop_overheads"]["results"]
    out["loop_overheads"] = "\n".join(
        [
            "| drawing the batch from the cache / a step | a logged step / an unlogged one |",
            "|---|---|",
            f"| {o['data_share']:.2%} ({o['step_ms']['draw_batch']:.1f} of "
            f"{o['step_ms']['step_unlogged']:.0f} ms) | {o['logging_ratio']:.3f}× |",
        ]
    )
    c = results["sampling_cost"]["results"]
    out["sampling_cost"] = "\n".join(
        [
            "| rows (2 × batch) | encoded at every step | encoded once | the encoding alone "
            "| step time ratio | same prediction |",
            "|---|---|---|---|---|---|",
            f"| {2 * c['workload']['batch']} | {c['step_ms']['encoded_each_step']:.0f} ms "
            f"| {c['step_ms']['encoded_once']:.0f} ms | {c['step_ms']['encoding']:.0f} ms "
            f"| **{_x(c['time_ratio'])}** | {'bit for bit' if c['bit_for_bit'] else 'no'} |",
        ]
    )
    if "step_speedups" in results:
        out["step_speedups"] = _step_speedups_table(results["step_speedups"]["results"])
    if "method_cost" in results:
        out["method_cost"] = _method_cost_table(results["method_cost"]["results"])
    return out


def _method_cost_table(r: dict) -> str:
    names = {  # (cnet.course sits above bench: the labels are spelled here too)
        "controlnet": "ControlNet",
        "controlnet-lite": "ControlNet-lite",
        "t2i-adapter": "T2I-Adapter",
        "controlnet-xs": "ControlNet-XS",
        "concat": "concatenation (whole U-Net)",
    }
    rows = [
        f"| method | trains | training step (batch {r['config']['batch_size']}) | step memory "
        f"| sampling {r['sampled']} images, 10 guided steps |",
        "|---|---|---|---|---|",
    ]
    for name in r["methods"]:
        rows.append(
            f"| {names.get(name, name)} | {r['trainable_parameters'][name] / 1e6:.2f}M "
            f"| {r['step_ms'][name]:.0f} ms (**{_x(r['step_time_ratio'][name])}**) "
            f"| {_mib(r['peak_memory_bytes'][name])} (**{_x(r['memory_ratio'][name])}**) "
            f"| {r['sampling_ms'][name]:.0f} ms (**{_x(r['sampling_ratio'][name])}** the base's) |"
        )
    rows.append(f"| the base alone | | | | {r['sampling_ms']['base']:.0f} ms (**1.00×**) |")
    return "\n".join(rows)


def _step_speedups_table(r: dict) -> str:
    names = {
        "plain": f"as the loop runs it ({r['threads']} thread{'s' if r['threads'] > 1 else ''})",
        "channels_last": "base and ControlNet in channels-last memory",
        "compiled": "the controlled U-Net under torch.compile",
        "one_thread": "one thread",
    }
    rows = ["| the step | median | against the loop's |", "|---|---|---|"]
    for way, ms in r["step_ms"].items():
        rows.append(f"| {names[way]} | {ms:.0f} ms | **{_x(r['time_ratio'][way])}** |")
    if "compile_s" in r:
        paid = r["break_even_steps"]
        rows.append(
            f"| compiling (the first compiled step) | {r['compile_s']:.0f} s | "
            + (f"paid back after {paid} steps |" if paid else "never paid back |")
        )
    return "\n".join(rows)
