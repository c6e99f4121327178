"""The settings of a ControlNet training run, nanoGPT-style: one dataclass, a profile fills it,
the command line overrides any field (:func:`cnet.settings.add_flags`), and every value is
checked before any work starts (:func:`cnet.settings.check_settings`: one line naming the
setting, the value and what is allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..settings import (
    Rule,
    SettingError,
    add_flags,
    check_settings,
    decay_rate,
    fraction,
    is_hub_id,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
    positive_number,
    settings_from_flags,
)
from ..world.data import TASKS
from ..world.metrics import SAMPLERS

__all__ = [
    "METHODS",
    "PRECISIONS",
    "PROFILES",
    "TASKS",
    "TIMESTEP_SAMPLING",
    "SettingError",
    "for_method",
    "not_taken",
    "TrainConfig",
    "add_flags",
    "check_settings",
    "resolve_device",
    "settings_from_flags",
]

# mixed precision, as accelerate names it; "auto" chooses by device (cnet.train.engine)
PRECISIONS = ("auto", "no", "fp16", "bf16")
# how a training step draws its timesteps (cnet.train.data.draw_timesteps)
TIMESTEP_SAMPLING = ("uniform", "cubic")
# what a run trains on the locked base: a ControlNet (ICCV), a T2I-Adapter (cnet.adapter), a
# ControlNet-XS (cnet.controlnet_xs), or the whole U-Net with the condition's latent
# concatenated to its input (concat: cnet.concat)
METHODS = ("controlnet", "t2i-adapter", "controlnet-xs", "concat")
# a ControlNet's own settings, at the values that leave them out: the other methods have no
# trainable copy, no condition encoder of ControlNet's and no connections to ablate...
CONTROLNET_ONLY = {
    "copy_lr_scale": 1.0,
    "hint_encoder": "released",
    "connections": "zero",
    "trainable_copy": "full",
    "gradient_checkpointing": False,
    "sd_locked": True,
}
# ...but the concatenating U-Net starts from the base's weights as ControlNet's copy does, and
# trains them at copy_lr_scale x lr (cnet.train.optim.pretrained_parameters)
ALSO_TAKEN = {"concat": ("copy_lr_scale",)}


def not_taken(method: str) -> dict:
    """The settings a run of ``method`` does not take, at the values that leave them out."""
    if method == "controlnet":
        return {}
    return {k: v for k, v in CONTROLNET_ONLY.items() if k not in ALSO_TAKEN.get(method, ())}


def for_method(profile: dict, method: str) -> dict:
    """A profile's values for a run of ``method``: those of settings the method does not take
    (:func:`not_taken`) left out, so that ``--profile quick --method t2i-adapter`` trains the
    profile's recipe, while the same setting given on the command line is refused."""
    return {k: v for k, v in profile.items() if k not in not_taken(method)}


@dataclass
class TrainConfig:
    """Every setting of a ControlNet training run; a profile (:data:`PROFILES`) changes some of
    the defaults."""

    base: str = "models/miniature-sd"  # a StableDiffusionPipeline folder (diffusers format)
    task: str = "fill"  # "fill", or a Shapes condition: outline, canny, segmentation, ...
    data: str = ""  # a folder of pairs instead of the world's task (cnet.train.folders)
    image_column: str = "image"  # metadata.jsonl's columns, as diffusers' script names them
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    out: str = "runs/controlnet-fill-quick"
    method: str = "controlnet"  # or t2i-adapter, controlnet-xs, concat (METHODS)
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3  # why: cnet.train.loop
    # the schedule (cnet.train.optim.lr_factor): constant, or from lr_decay_start (0: never)
    # linearly down to lr_min_share x lr over lr_decay_steps, and on at that floor
    lr_decay_start: int = 0
    lr_decay_steps: int = 100
    lr_min_share: float = 0.1
    # the trainable copy's rate as a share of lr (the condition encoder and the zero
    # convolutions train at lr): a pretrained copy slower than the parts that start from scratch
    copy_lr_scale: float = 1.0
    # clip the update's total gradient norm to this (0: never), as diffusers' script does at 1.0;
    # the miniature's norm is about 0.03, so only a clip near it can catch a spike
    max_grad_norm: float = 0.0
    weight_decay: float = 1e-2  # AdamW's default, as the released code leaves it
    # > 0: an average of the ControlNet's weights (diffusers' EMAModel, cnet.averaging) is what
    # the evaluations sample, best.safetensors keeps, and export, sample and evaluate load
    ema_decay: float = 0.0
    empty_prompt_ratio: float = 0.5
    timesteps: str = "uniform"  # how training draws t: uniform, or cubic (cnet.train.data)
    sd_locked: bool = True
    decoder_lr_scale: float = 0.1
    hint_encoder: str = "released"
    # the paper's ablations (cnet.variants, ICCV §4.2): what connects the copy to the base, and
    # the copy itself
    connections: str = "zero"  # zero, gaussian (std = connection_gain x default init's), none
    connection_gain: float = 1.0
    connection_std: float = 0.0  # > 0: the Gaussian's std for every connection, not by gain
    trainable_copy: str = "full"  # full, or lite: one convolution per block
    train_size: int = 4096
    eval_size: int = 32
    eval_every: int = 50
    eval_steps: int = SAMPLERS["quick"]["steps"]  # DDIM steps when sampling the evaluation set
    guidance_scale: float = SAMPLERS["quick"]["guidance"]
    log_every: int = 1
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"  # auto: bf16 or fp16 by GPU, fp32 on CPU (cnet.train.engine)
    gradient_checkpointing: bool = False  # recompute the copy's activations in backward
    # base and ControlNet in channels-last memory: a faster step on the CPU (bench/README.md §7),
    # other rounding; the quick profile's choice, off by default so that the full profile's
    # shipped run repeats bit for bit
    channels_last: bool = False
    resume: bool = True

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def check(self) -> TrainConfig:
        """Refuse any value that cannot work (:class:`SettingError`); returns the config."""
        check_settings(self, _TRAIN_RULES)
        base = Path(self.base)
        if not (base / "model_index.json").exists() and not is_hub_id(self.base):
            raise SettingError(
                f"base: {self.base!r} is not a diffusers pipeline folder (no model_index.json "
                "there); expected e.g. models/miniature-sd, or a hub id such as "
                "stable-diffusion-v1-5/stable-diffusion-v1-5 where a hub is reachable"
            )
        for name, value in not_taken(self.method).items():
            if getattr(self, name) != value:
                raise SettingError(
                    f"{name}: {getattr(self, name)!r} is not allowed with method "
                    f"{self.method} (a ControlNet's setting); expected {value!r}"
                )
        if self.ema_decay and not self.sd_locked:
            raise SettingError(
                f"ema_decay: {self.ema_decay!r} is not allowed with sd_locked false; the "
                "average is of the ControlNet's weights alone, so expected 0 there"
            )
        if self.data and not Path(self.data).is_dir():
            raise SettingError(
                f"data: {self.data!r} is not a folder; expected a folder with "
                "prompt.json or metadata.jsonl (cnet.train.folders)"
            )
        return self


# A profile is the settings it changes from the defaults. Its eval_steps and guidance_scale are
# the sampler every fidelity number of that profile is measured with (cnet.world.metrics.SAMPLERS).
PROFILES: dict[str, dict] = {
    # the recipe study's choice (figures/recipe_study.json; why: cnet.train.loop)
    "quick": {
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "max_grad_norm": 0.1,
        "batch_size": 32,
        "steps": 800,
        "timesteps": "cubic",
        "lr_decay_start": 500,
        "lr_decay_steps": 300,
        "channels_last": True,
    },
    "full": dict(
        out="runs/controlnet-fill-full",
        steps=3000,
        batch_size=32,
        train_size=20_000,
        eval_size=64,
        eval_every=100,
        eval_steps=SAMPLERS["full"]["steps"],
        guidance_scale=SAMPLERS["full"]["guidance"],
        log_every=5,
        checkpoint_every=250,
    ),
}


# ------------------------------------------------------------------------------------------
# Checking values
# ------------------------------------------------------------------------------------------


def device_rule() -> Rule:
    def ok(value: str) -> bool:
        try:
            resolve_device(value)
        except (RuntimeError, ValueError):
            return False
        return True

    available = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return ok, "a device this machine has: " + ", ".join(available)


_TRAIN_RULES: dict[str, Rule] = {
    "task": one_of(*TASKS),
    "method": one_of(*METHODS),
    "steps": positive_int(),
    "batch_size": positive_int(),
    "grad_accum": positive_int(),
    "lr": positive_number(),
    "copy_lr_scale": positive_number(),
    "max_grad_norm": non_negative_number(),
    "lr_decay_start": non_negative_int(),
    "lr_decay_steps": positive_int(),
    "lr_min_share": fraction(),
    "weight_decay": non_negative_number(),
    "ema_decay": decay_rate(),
    "empty_prompt_ratio": fraction(),
    "timesteps": one_of(*TIMESTEP_SAMPLING),
    "decoder_lr_scale": non_negative_number(),
    "hint_encoder": one_of("released", "paper"),
    "connections": one_of("zero", "gaussian", "none"),
    "connection_gain": positive_number(),
    "connection_std": non_negative_number(),
    "trainable_copy": one_of("full", "lite"),
    "train_size": positive_int(),
    "eval_size": positive_int(),
    "eval_every": non_negative_int(),
    "eval_steps": positive_int(),
    "guidance_scale": non_negative_number(),
    "log_every": positive_int(),
    "checkpoint_every": positive_int(),
    "seed": non_negative_int(),
    "device": device_rule(),
    "mixed_precision": one_of(*PRECISIONS),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where there is one, else the CPU; any other name must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"no CUDA device {name!r} on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("no MPS device on this machine")
    return device
