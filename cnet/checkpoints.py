"""The one checkpoint format, below everything that trains (a ControlNet, the world's base).

One safetensors file: ``<module>.<key>`` for the weights of every module being trained,
``optimizer.<i>.<name>`` for the optimizer's state, and metadata ``step``, ``wall_time_s``
(training time behind these weights, over every resume) and ``config`` (the run's settings,
JSON). It is written to a temporary name and moved into place, so a crash never leaves half a
checkpoint. A run's best evaluation keeps its weights in the same format without the optimizer
(:func:`save_weights`), and a shipped model may store its weights in half precision
(:func:`store_half`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .settings import SettingError

__all__ = [
    "BEST_WEIGHTS",
    "WEIGHTS",
    "check_resumable",
    "checkpoint_metadata",
    "checkpoint_wall_time",
    "load_checkpoint",
    "save_checkpoint",
    "save_weights",
    "store_half",
    "weights_file",
]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optimizer.{pid}.{name}"] = (
                (value if torch.is_tensor(value) else torch.tensor(value))
                .detach()
                .cpu()
                .contiguous()
            )
    return out


def save_checkpoint(
    path: Path,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    step: int,
    config: Mapping[str, Any],
    wall_time_s: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Weights of every module, the optimizer state, the step, the settings and the training
    time so far, in one file written to a temporary name and moved into place. ``extra``: more
    state a resume needs (e.g. fp16's loss scale), stored as JSON in the metadata under its
    keys."""
    tensors = {
        f"{prefix}.{k}": v.detach().cpu().contiguous()
        for prefix, module in modules.items()
        for k, v in module.state_dict().items()
    }
    if optimizer is not None:
        tensors.update(_optimizer_tensors(optimizer))
    metadata = {
        "step": str(step),
        "config": json.dumps(dict(config)),
        "wall_time_s": f"{wall_time_s:.1f}",
    }
    metadata.update({key: json.dumps(value) for key, value in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic on POSIX: the old checkpoint stays valid until this instant


#: The weights of a run's best evaluation, kept beside its latest checkpoint (no optimizer state).
BEST_WEIGHTS = "best.safetensors"
#: Which of a run's weights to load, ship or sample: its last checkpoint, or its best evaluation's.
WEIGHTS = ("latest", "best")


def save_weights(
    path: Path, modules: Mapping[str, torch.nn.Module], step: int, metrics: Mapping[str, float]
) -> None:
    """The modules' weights at ``step`` with the evaluation they scored (``metrics``), written
    to a temporary name and moved into place, in the checkpoint's format without the
    optimizer."""
    tensors = {
        f"{prefix}.{k}": v.detach().cpu().contiguous()
        for prefix, module in modules.items()
        for k, v in module.state_dict().items()
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"step": str(step), "metrics": json.dumps(dict(metrics))})
    os.replace(tmp, path)


def weights_file(run: Path, weights: str = "latest") -> Path:
    """The file holding a run's ``weights``: ``latest`` (checkpoint.safetensors) or ``best``
    (:data:`BEST_WEIGHTS`)."""
    if weights not in WEIGHTS:
        raise SettingError(f"weights: {weights!r} is not allowed; expected latest or best")
    path = run / ("checkpoint.safetensors" if weights == "latest" else BEST_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path.name} in {run}: expected a training run"
            + (" that evaluated at least once" if weights == "best" else "")
        )
    return path


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The checkpoint's metadata; a clear error for a file in a format cnet no longer reads."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "step" not in metadata:
        raise SettingError(
            f"{path} is a checkpoint from an earlier cnet whose format is no longer read "
            "(no 'step' in its metadata); start the run in a new folder"
        )
    return metadata


def load_checkpoint(
    path: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None
) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    step = int(checkpoint_metadata(path)["step"])
    tensors = load_file(path)
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(sub, strict=True)
    if optimizer is not None:
        state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                state["state"].setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict(state)
        # the moments come back in the layout they were saved in (contiguous); a parameter in
        # another one (channels-last) gets them in its own, as fused AdamW on a GPU requires
        for group in optimizer.param_groups:
            for p in group["params"]:
                for name, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        if value.stride() != p.stride():
                            optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype)
                            optimizer.state[p][name].copy_(value)
    return step


def checkpoint_wall_time(path: Path) -> float:
    """Seconds of training behind the checkpoint at ``path``, over all resumes (nan where the
    checkpoint did not record it)."""
    return float(checkpoint_metadata(path).get("wall_time_s", "nan"))


def check_resumable(
    path: Path,
    settings: Mapping[str, Any],
    steps: int,
    may_change: Iterable[str],
    defaults: Mapping[str, Any] | None = None,
    remedy: str = "pass a new --out, or --resume false to start over",
) -> None:
    """Refuse to resume a checkpoint trained with other settings (except those in
    ``may_change``, which do not change what the steps already taken computed), saying the
    command's ``remedy``, or one that is already past the requested ``steps``. A setting the
    checkpoint does not record (it predates it) counts as its value in ``defaults``, what that
    checkpoint was trained with."""
    metadata = checkpoint_metadata(path)
    step, saved = int(metadata["step"]), json.loads(metadata["config"])
    saved = {**(defaults or {}), **saved}
    changed = [
        k for k, v in settings.items() if k not in may_change and k in saved and saved[k] != v
    ]
    if changed:
        raise SettingError(
            f"{path} was trained with other settings ("
            + ", ".join(f"{k}: {saved[k]!r} there, {settings[k]!r} now" for k in changed)
            + f"); {remedy}"
        )
    if step > steps:
        raise SettingError(f"{path} is at step {step}, beyond the requested {steps} steps")


def store_half(module: torch.nn.Module, folder: str | Path) -> None:
    """Replace the weights a diffusers ``save_pretrained`` wrote to ``folder`` by the same
    weights in half precision (half the bytes, as community checkpoints are usually shared;
    diffusers' ``from_pretrained`` loads them back as float32), and round ``module`` to what is
    now stored, so that what a caller measures next is what ships."""
    half = {k: v.to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(half, Path(folder) / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    module.load_state_dict({k: v.float() for k, v in half.items()})
