"""Speed and memory, measured: ``python -m cnet bench [--quick] [--out DIR]``.

Every figure is a ratio of two things measured in one run on one machine (:mod:`.measure`),
written with the command, the machine and the date to ``DIR/<suite>.json`` beside a figure
(``DIR/<suite>.png``). The committed results live in ``bench/results/`` (``--out
bench/results`` replaces them); by default a run writes to ``runs/bench`` and touches nothing
shipped.

=================  ===========================================================================
module             what it holds
=================  ===========================================================================
workloads          SD1.5-topology U-Nets at a width, SD's VAE and text encoder, the two steps
measure            interleaved timing, peak tensor memory, the machine
suites             step_cost, loop_cost, scaling, loop_overheads, sampling_cost, step_speedups,
                   method_cost
report             the figures
=================  ===========================================================================
"""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..train import TrainConfig
from ..train.config import PROFILES
from .measure import machine
from .suites import (
    loop_cost,
    loop_overheads,
    method_cost,
    sampling_cost,
    scaling,
    step_cost,
    step_speedups,
)

__all__ = ["PLANS", "SUITES", "run_bench"]

#: Every suite, in the order a full bench runs them.
SUITES = (
    "step_cost",
    "loop_cost",
    "scaling",
    "loop_overheads",
    "sampling_cost",
    "step_speedups",
    "method_cost",
)

# What each suite runs, per plan. "quick" is CI's (well under a minute on 2 CPU cores: tiny
# sizes, so its numbers check the machinery, not the claims); "full" made bench/results/.
PLANS: dict[str, dict] = {
    "quick": {
        "repeats": 2,
        "step_cost": [{"unet": "miniature", "latent_size": 8, "batch": 4, "text_length": 16}],
        "loop_cost": [{"unet": "miniature", "resolution": 64, "batch": 4}],
        "scaling": {
            "workload": {"unet": "sd15", "width": 1 / 8, "latent_size": 4, "batch": 1},
            "batches": [1, 2],
            "latent_sizes": [4, 8],
        },
        "loop_overheads": {"batch_size": 4, "train_size": 16},
        "sampling_cost": {"controlnet": "models/controlnet-fill", "batch": 2},
        # compiling alone takes minutes on a CPU, so CI's plan leaves it out
        "step_speedups": {"batch_size": 4, "train_size": 16, "compile_step": False},
        "method_cost": {"batch_size": 4, "train_size": 16, "sampled": 2},
    },
    "full": {
        "repeats": 5,
        "step_cost": [
            {"unet": "miniature", "latent_size": 8, "batch": 32, "text_length": 16},
            {"unet": "sd15", "width": 1 / 4, "latent_size": 32, "batch": 2},
            {"unet": "sd15", "width": 1 / 2, "latent_size": 32, "batch": 1},
        ],
        "loop_cost": [
            {"unet": "miniature", "resolution": 64, "batch": 32},
            {"unet": "sd15", "width": 1 / 4, "resolution": 512, "batch": 1},
        ],
        "scaling": {
            "workload": {"unet": "sd15", "width": 1 / 8, "latent_size": 16, "batch": 2},
            "batches": [1, 2, 4, 8],
            "latent_sizes": [8, 16, 32, 64],
        },
        "loop_overheads": {"batch_size": 32, "train_size": 1024},
        "sampling_cost": {"controlnet": "models/controlnet-fill", "batch": 64},
        "step_speedups": {"batch_size": PROFILES["quick"]["batch_size"], "train_size": 256},
        # the methods compared in notebook 08, as their runs train (the quick profile)
        "method_cost": {"train_size": 256, "sampled": 8},
    },
}


def _record(name: str, result: dict, plan: str, out: Path, command: str) -> Path:
    record = {
        "suite": name,
        "plan": plan,
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "results": result,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def run_bench(
    plan: str = "full",
    out: str | Path = "runs/bench",
    threads: int | None = None,
    suites: tuple[str, ...] = SUITES,
    command: str = "python -m cnet bench",
) -> dict[str, Path]:
    """Run the plan's suites, write each one's JSON (with ``command``, the machine and the
    date) and figure to ``out``; returns the paths."""
    import matplotlib.pyplot as plt

    from .report import draw

    settings = PLANS[plan]
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    repeats, written = settings["repeats"], {}
    results: dict[str, object] = {}
    if "step_cost" in suites:
        results["step_cost"] = [step_cost(w, repeats, device) for w in settings["step_cost"]]
    if "loop_cost" in suites:
        results["loop_cost"] = [loop_cost(w, repeats, device) for w in settings["loop_cost"]]
    if "scaling" in suites:
        s = settings["scaling"]
        results["scaling"] = scaling(
            s["workload"], s["batches"], s["latent_sizes"], repeats, device
        )
    if "loop_overheads" in suites:
        config = TrainConfig(**settings["loop_overheads"], device=device.type)
        results["loop_overheads"] = loop_overheads(config, max(repeats, 5))
    if "sampling_cost" in suites:
        results["sampling_cost"] = sampling_cost(settings["sampling_cost"], max(repeats, 5), device)
    if "step_speedups" in suites:
        s = dict(settings["step_speedups"])
        compile_step = s.pop("compile_step", True)
        config = TrainConfig(**{**PROFILES["quick"], **s}, device=device.type)
        results["step_speedups"] = step_speedups(config, max(repeats, 9), compile_step)
    if "method_cost" in suites:
        from ..experiments.methods import METHODS_COMPARED, method_config

        s = dict(settings["method_cost"])
        sampled = s.pop("sampled")
        methods = {
            name: replace(method_config(name, 0), **s, device=device.type)
            for name in METHODS_COMPARED
        }
        results["method_cost"] = method_cost(methods, max(repeats, 5), sampled)
    for name, result in results.items():
        written[name] = _record(name, result, plan, out, command)
        figure = draw(name, result, plan)
        if figure is not None:
            figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
            written[f"{name}.png"] = out / f"{name}.png"
    return written
