"""Which knob makes convergence sudden: runs that differ in one setting, trained side by side.

python -m cnet compare --knob lr --values 2e-4 1e-3 --label "quick profile, CPU"
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from ..settings import flag_type
from ..train.config import SettingError, TrainConfig
from ..train.convergence import detect_sudden_convergence
from ..train.loop import train
from ..train.runs import read_log

__all__ = ["compare_runs", "run_folder", "train_comparison"]


def run_folder(config: TrainConfig, root: str = "runs/compare") -> str:
    """A run's folder, named by every setting that differs from the defaults, so a run that two
    comparisons share (their common baseline) is trained once and resumed after."""
    changed = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if f.name != "out" and getattr(config, f.name) != f.default
    ]
    return f"{root}/" + ("_".join(changed) or "default")


def train_comparison(settings: TrainConfig, knob: str, values: Sequence[str]) -> dict[str, str]:
    """Train (or resume) one run per value of ``knob`` on top of ``settings``; returns
    ``{value as given: run folder}``."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if knob not in fields or knob == "out":
        raise SettingError(
            f"knob: {knob!r} is not a training setting; expected one of "
            + ", ".join(k for k in fields if k != "out")
        )
    configs = {}
    for text in values:  # every value is checked before the first run starts
        try:
            value = flag_type(fields[knob])(text)
        except (ValueError, TypeError) as error:
            raise SettingError(f"{knob}: {text!r} is not allowed ({error})") from None
        config = dataclasses.replace(settings, **{knob: value})
        configs[text] = dataclasses.replace(config, out=run_folder(config)).check()
    runs = {}
    for text, config in configs.items():
        print(
            f"--- {knob} = {text}: {config.steps} steps of batch {config.batch_size}"
            f" x {config.grad_accum}, lr {config.lr}, into {config.out}"
        )
        train(config, profile=f"compare {knob}")
        runs[text] = config.out
    return runs


def compare_runs(runs: dict[str, str | Path]) -> dict:
    """Fidelity curves and convergence reports of several runs (label → run folder), for
    :func:`cnet.course.plots.plot_knob_comparison`. Every run needs at least 5 evaluations."""
    result = {}
    for label, run in runs.items():
        log = read_log(run)
        report = detect_sudden_convergence(log.eval_steps, log.eval_iou)
        result[label] = {
            "run": str(run),
            "eval_steps": log.eval_steps,
            "eval_iou": log.eval_iou,
            "eval_colours": log.eval_colours,
            "report": report.as_dict(),
            "config": json.loads((Path(run) / "config.json").read_text()),
        }
    return result
