"""Where the course's figures go, and a training run's figures drawn from its folder.

Figures the notebooks and ``python -m cnet lessons`` draw are written to ``figures/`` of the
clone (or ``$CNET_FIGURES``, which the test suite points elsewhere so that running it leaves
the repository's figures as they are). A training run's figures belong to the run: ``python -m
cnet train`` writes them to ``<run>/figures/`` and to another folder only when asked to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
from safetensors.torch import load_file

from .training_plots import (
    plot_fidelity_and_loss,
    plot_first_step_gradients,
    plot_sample_grid,
    plot_zero_conv_growth,
)

__all__ = [
    "figures_dir",
    "repo_root",
    "run_figures",
    "save_figure",
    "save_numbers",
    "write_run_figures",
]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def repo_root() -> Path | None:
    """The clone whose models/, notebooks/ and figures/ the course uses: the one this package
    lives in; else ``$CNET_ROOT`` (which every notebook's setup cell sets to the clone it found
    or made); else a clone holding the current folder. None for an installed copy with no clone
    in sight."""
    candidates = [PACKAGE_ROOT.parent]
    if os.environ.get("CNET_ROOT"):
        candidates.append(Path(os.environ["CNET_ROOT"]))
    candidates += [Path.cwd(), *Path.cwd().parents]
    return next((p for p in candidates if _is_clone(p)), None)


def _is_clone(folder: Path) -> bool:
    return (folder / "notebooks").is_dir() and (folder / "models").is_dir()


def figures_dir() -> Path:
    """Where figures are written: $CNET_FIGURES, else the clone's figures/, else ./figures."""
    if "CNET_FIGURES" in os.environ:
        path = Path(os.environ["CNET_FIGURES"])
    else:
        root = repo_root()
        path = (root if root is not None else Path.cwd()) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(
    fig: plt.Figure, name: str, folder: str | Path | None = None, dpi: int = 110
) -> Path:
    """Write ``fig`` to ``<folder>/<name>.png`` (default :func:`figures_dir`); returns the path."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def save_numbers(numbers: dict, name: str, folder: str | Path | None = None) -> Path:
    """Write the numbers behind a figure to ``<folder>/<name>.json`` beside it."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(numbers, indent=1) + "\n")
    return path


def run_figures(run: str | Path, label: str = "") -> dict:
    """A run's figures (the run folder, or a shipped one): fidelity and loss with the detected
    convergence step, the zero convolutions' growth, the first steps' gradients, and a grid of
    samples before, at and after the jump. Returns ``{name: Figure}`` and the detector's report
    under ``"report"`` (None with fewer than 5 evaluations)."""
    # imported here: cnet.train loads diffusers, which the notebooks that only save a figure of
    # the math lessons (01, 02) do without
    from ..train.convergence import detect_sudden_convergence
    from ..train.runs import read_config, read_log

    run = Path(run)
    log = read_log(run)
    report = (
        detect_sudden_convergence(log.eval_steps, log.eval_iou)
        if len(log.eval_steps) >= 5
        else None
    )
    figures = {
        "fidelity_and_loss": plot_fidelity_and_loss(log, report, label),
        "zero_conv_growth": plot_zero_conv_growth(log, label),
        "first_steps_gradients": plot_first_step_gradients(log, label=label),
    }
    samples = load_file(run / "samples.safetensors")
    steps = sorted(int(k.split("_")[1]) for k in samples)
    if report is not None and report.converged:
        # the last sampled evaluation before the jump starts, so that "late" and "sudden" differ
        before = max((s for s in steps if s < report.start), default=steps[0])
        wanted = [steps[0], before, report.start, report.step, report.end, steps[-1]]
    else:
        wanted = [steps[round(q * (len(steps) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)]
    shown = sorted({min(steps, key=lambda s, w=w: abs(s - w)) for w in wanted})
    config = read_config(run)
    if config.data:  # a folder's pairs: no exact region to rank or outline by
        conditions = None
    else:
        conditions, regions, ranked = conditions_the_base_misses(
            config, samples[f"step_{steps[0]}"]
        )
    if conditions is not None:
        rows = ranked[: min(6, len(ranked))]
        figures["samples_over_training"] = plot_sample_grid(
            {k: v[rows] for k, v in samples.items()},
            conditions[rows],
            shown,
            label,
            regions=regions[rows],
        )
    figures["report"] = report
    return figures


def conditions_the_base_misses(config, first_samples):
    """The evaluation set's conditions, the regions they ask for, and their indices ordered
    from the worst-followed to the best at the first evaluation (the locked base's samples,
    step 0: the rows where a ControlNet's work shows). Ties keep the set's order."""
    import torch

    from ..train.data import condition_images, task_dataset
    from ..train.evaluation import fidelity

    resolution = first_samples.shape[-1]
    n = len(first_samples)
    conditions = condition_images(config.task, config.eval_size, config.seed, resolution)[:n]
    dataset = task_dataset(config.task, n, "eval", resolution, config.seed)
    batch, scenes = dataset.batch(list(range(n))), dataset.scenes(list(range(n)))
    regions = batch["layers"] > 0  # as the evaluation measures it (cnet.train.data.cache_data)
    per_image = fidelity(
        first_samples.float() / 127.5 - 1,
        torch.from_numpy(scenes.colour[:, 0].copy()),
        torch.from_numpy(scenes.background.copy()),
        regions,
    )
    ranked = torch.tensor(sorted(range(n), key=lambda i: (float(per_image["iou"][i]), i)))
    return conditions, regions, ranked


def write_run_figures(
    run: str | Path, folder: str | Path | None = None, prefix: str = "", label: str = ""
) -> list[Path]:
    """Save :func:`run_figures` as ``<folder>/<prefix><name>.png``, by default in
    ``<run>/figures``; returns the paths."""
    folder = Path(folder) if folder is not None else Path(run) / "figures"
    figures = run_figures(run, label)
    figures.pop("report")
    paths = [save_figure(fig, f"{prefix}{name}", folder) for name, fig in figures.items()]
    plt.close("all")
    return paths


def write_recipe_figures(result: dict, folder: str | Path) -> list[Path]:
    """The recipe study's figure (``recipe_study.png``) and, where the study checked its choice
    on more seeds, that check's (``recipe_check.png``), in ``folder``; for a profile checked over
    seeds (``python -m cnet recipe --profile P``), ``P_check.png``."""
    from .training_plots import plot_profile_check, plot_recipe_study

    if "profile" in result:
        return [save_figure(plot_profile_check(result), f"{result['profile']}_check", folder)]
    parts = (("recipe_study", result), ("recipe_check", result.get("check")))
    # one panel per recipe, ten seeds each: at 80 dpi, so that notebook 05, which shows the
    # check, stays within the size a stored notebook may have
    return [
        save_figure(plot_recipe_study(part), name, folder, dpi=80) for name, part in parts if part
    ]
