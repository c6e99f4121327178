"""Run folders: resuming (the log cut back to the checkpoint), reading a run's log back,
shipping a run and loading a shipped ControlNet. The checkpoint format itself is
:mod:`cnet.checkpoints`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..checkpoints import (
    BEST_WEIGHTS,
    WEIGHTS,
    check_resumable,
    checkpoint_metadata,
    checkpoint_wall_time,
    load_checkpoint,
    save_checkpoint,
    save_weights,
    store_half,
    weights_file,
)
from ..controlnet import ControlNet
from ..convert import from_diffusers, to_diffusers
from .config import SettingError, TrainConfig
from .models import build_controlnet, build_trained, load_base, trained_name

__all__ = [
    "RUN_FILES",
    "TrainingLog",
    "check_resumable",
    "checkpoint_metadata",
    "checkpoint_wall_time",
    "export_run",
    "finite_or_none",
    "load_checkpoint",
    "BEST_WEIGHTS",
    "WEIGHTS",
    "base_of",
    "load_controlnet",
    "read_config",
    "read_log",
    "result_prefix",
    "run_finished",
    "save_checkpoint",
    "save_weights",
    "store_half",
    "weights_file",
    "truncate_log",
]


def truncate_log(path: Path, start: int) -> None:
    """Drop log entries a resumed run will write again (those after the checkpoint's step)."""
    if start == 0 or not path.exists():
        path.write_text("")
        return
    keep = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        # what the step-``start`` checkpoint already evaluated and reported stays
        if entry["step"] < start or (
            ("eval" in entry or "alert" in entry) and entry["step"] <= start
        ):
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------
# Reading a run back
# ------------------------------------------------------------------------------------------


@dataclass
class TrainingLog:
    """A run's ``log.jsonl`` as columns: per logged step the loss, each zero conv's weight and
    gradient norm, the trainable copy's and the condition encoder's inner layers' gradient norms
    (``hint_grad_norm``: None in logs written before it was recorded); per evaluation the
    fidelity."""

    steps: list[int]
    loss: list[float]
    weight_norm: dict[str, list[float]]
    grad_norm: dict[str, list[float]]
    copy_grad_norm: list[float]
    hint_grad_norm: list[float | None]
    eval_steps: list[int]
    eval_iou: list[float]
    eval_colours: list[float]


def read_log(path: str | Path) -> TrainingLog:
    """Parse a run's log (the file, or the run folder holding ``log.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}: expected a run folder")
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_entries = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval" in e]
    names = list(train_entries[0]["weight_norm"]) if train_entries else []
    return TrainingLog(
        steps=[e["step"] for e in train_entries],
        loss=[e["loss"] for e in train_entries],
        weight_norm={n: [e["weight_norm"][n] for e in train_entries] for n in names},
        grad_norm={n: [e["grad_norm"][n] for e in train_entries] for n in names},
        copy_grad_norm=[e["copy_grad_norm"] for e in train_entries],
        hint_grad_norm=[e.get("hint_grad_norm") for e in train_entries],
        eval_steps=[e["step"] for e in evals],
        # a folder's run has no exact fidelity (its validation measures edge F1)
        eval_iou=[e["eval"].get("iou") for e in evals],
        eval_colours=[e["eval"].get("colours_ok") for e in evals],
    )


def read_config(run: str | Path) -> TrainConfig:
    """The settings a run was made with (its ``config.json``)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {run}: expected a run folder")
    return TrainConfig(**json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------
# Shipping a trained ControlNet, and loading it back
# ------------------------------------------------------------------------------------------

RUN_FILES = ("log.jsonl", "config.json", "run.json")


def run_finished(config: TrainConfig) -> bool:
    """Whether the run ``config`` asks for has reached its steps: its ``run.json`` says so (a
    continuation's folder holds a copy of the shorter run's until it has run on)."""
    record = Path(config.out) / "run.json"
    return record.exists() and json.loads(record.read_text())["steps"] == config.steps


def result_prefix(config: TrainConfig) -> str:
    """Which module in a run's checkpoint is the run's result: the ControlNet (or adapter) it
    trained, or with ``ema_decay`` the average of its weights, which its evaluations sampled.
    (A run's ``best.safetensors`` holds the evaluated weights under the plain name either
    way: :func:`cnet.train.models.trained_name`.)"""
    return ("ema_" if config.ema_decay else "") + trained_name(config.method)


def export_run(
    run: str | Path,
    out: str | Path,
    samples_kept: int = 8,
    half: bool = False,
    weights: str = "latest",
) -> Path:
    """Ship a finished run: its ControlNet as a diffusers ``ControlNetModel`` folder
    (``out/controlnet``, safetensors, loadable with ``ControlNetModel.from_pretrained``; a
    T2I-Adapter run's adapter as a ``T2IAdapter`` folder, ``out/adapter``; with
    ``half``, stored in half precision by :func:`store_half`) beside the run's log, config and
    summary, and the evaluation samples of its first ``samples_kept`` conditions at every
    evaluation. ``out`` is then itself a run folder: :func:`read_log` reads it as it reads
    ``run``. The optimizer state is left behind. ``weights``: the run's last weights, or those
    of its best evaluation (``best``, recorded in the shipped ``run.json``)."""
    run, out = Path(run), Path(out)
    checkpoint = run / "checkpoint.safetensors"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint.safetensors in {run}: expected a training run")
    config = read_config(run)
    if config.hint_encoder != "released":
        raise SettingError(
            "only the released condition encoder has a diffusers ControlNetModel "
            f"form; this run used {config.hint_encoder!r}"
        )
    if config.connections == "none" or config.trainable_copy == "lite":
        raise SettingError(
            "a ControlNetModel has zero convolutions and a full trainable copy; "
            f"this run is an ablation (connections {config.connections!r}, "
            f"trainable_copy {config.trainable_copy!r}), kept as its run folder"
        )
    trained = build_trained(load_base(config.base), config)
    step = load_checkpoint(checkpoint, {result_prefix(config): trained}, None)
    if step != config.steps:
        raise SettingError(
            f"the run in {run} stopped at step {step} of {config.steps}; "
            "finish it (run the same command again) before shipping it"
        )
    shipped_weights = {"weights": weights, "step": step}
    if weights != "latest":  # run.json's final_eval stays the last step's; this says what ships
        best = weights_file(run, weights)
        if int(checkpoint_metadata(best)["step"]) == 0:
            raise SettingError(
                f"weights: 'best' is not allowed for {run}: no evaluation beat "
                "step 0's, the untrained ControlNet (the base itself); ship latest"
            )
        shipped_weights = {
            "weights": weights,
            "step": load_checkpoint(best, {trained_name(config.method): trained}, None),
            **json.loads(checkpoint_metadata(best)["metrics"]),
        }
    if out.exists() and any(out.iterdir()) and not (out / "run.json").exists():
        raise SettingError(f"{out} exists and is not a shipped run; export into a new folder")
    # written beside `out` and moved into place whole: a crash leaves no half-shipped folder
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shipped = to_diffusers(trained) if isinstance(trained, ControlNet) else trained
    shipped.save_pretrained(staging / trained_name(config.method), safe_serialization=True)
    if half:
        store_half(shipped, staging / trained_name(config.method))
    for name in RUN_FILES:
        (staging / name).write_bytes((run / name).read_bytes())
    record = json.loads((staging / "run.json").read_text())
    record["shipped_weights"] = shipped_weights
    (staging / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    samples = load_file(run / "samples.safetensors")
    save_file(
        {k: v[:samples_kept].contiguous() for k, v in samples.items()},
        staging / "samples.safetensors",
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def load_controlnet(folder: str | Path, weights: str = "latest") -> ControlNet:
    """A shipped ControlNet (see :func:`export_run`), any diffusers ``ControlNetModel`` folder,
    or a training run's folder (its latest checkpoint, finished or not, or with ``weights``
    ``best`` its best evaluation's weights), as a cnet :class:`~cnet.controlnet.ControlNet`."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    if (folder / "checkpoint.safetensors").is_file() and not (folder / "controlnet").is_dir():
        config = read_config(folder)
        if config.method != "controlnet":
            raise SettingError(
                f"{folder} trained a {config.method}, not a ControlNet; "
                "python -m cnet export ships it as its diffusers class's folder"
            )
        if not config.sd_locked:
            raise SettingError(
                f"{folder} trained the U-Net's decoder too (sd_locked false); its "
                "ControlNet alone would be sampled with the untrained decoder"
            )
        path = weights_file(folder, weights)
        controlnet = build_controlnet(load_base(config.base), config)
        prefix = result_prefix(config) if weights == "latest" else "controlnet"
        load_checkpoint(path, {prefix: controlnet}, None)
        return controlnet.eval()
    if weights != "latest":
        raise SettingError(
            f"weights: {weights!r} is not allowed for {folder}, a shipped "
            "ControlNet (one set of weights); expected latest, or a training "
            "run's folder"
        )
    if (folder / "controlnet" / "config.json").exists():
        folder = folder / "controlnet"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no ControlNetModel in {folder}: expected a config.json there "
            "or in its controlnet/ subfolder"
        )
    model = ControlNetModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return from_diffusers(model).eval()


def base_of(folder: str | Path) -> str:
    """The base a run or a shipped ControlNet was trained on, as it recorded it."""
    folder = Path(folder)
    for name, key in (("config.json", None), ("run.json", "config")):
        path = folder / name
        if path.is_file():
            record = json.loads(path.read_text())
            record = record.get(key, {}) if key else record
            if "base" in record:
                return record["base"]
    return TrainConfig.base
