"""A community fine-tune in miniature: the pretrained base's U-Net trained further in a new style.

    python -m cnet.world finetune --profile full --out models/miniature-sd-cycled

The paper applies ControlNets trained on Stable Diffusion 1.5 to community models fine-tuned from
it. This makes such a model from the shipped base: the same stage as pretraining's U-Net stage
(:func:`cnet.world.pretrain._train_unet`, its loss, schedule, EMA and exact resume), on the same
scenes painted in another palette (:data:`cnet.world.palette.STYLES`), the U-Net alone.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import store_half
from ..settings import SettingError
from .data import FillDataset, ShapesDataset
from .model import load_pipeline
from .palette import STYLES
from .pretrain import (
    STAGE_SETTINGS,
    Settings,
    _latest_entries,
    _train_unet,
    cpu_description,
    refuse_unused,
)

__all__ = ["FINETUNE_PROFILES", "finetune", "style_of"]


#: A style fine-tune: the U-Net alone, a few minutes on a CPU ("full"), or seconds (tests).
FINETUNE_PROFILES: dict[str, dict] = {
    "quick": dict(style="cycled", unet_steps=4, unet_batch=4, warmup_steps=2, checkpoint_every=2),
    "full": dict(
        style="cycled",
        unet_steps=2400,
        unet_batch=32,
        unet_lr=1e-3,
        warmup_steps=100,
        ema_decay=0.99,
        checkpoint_every=100,
    ),
}


def finetune(
    base: Path, settings: Settings, out: Path, run_dir: Path, command: list[str] | None = None
):
    """A community fine-tune in miniature: the base's U-Net trained on with the same loss on
    images painted in another palette (``settings.style``), the VAE, text encoder and tokenizer
    left as they are. Of ``settings`` only the style stage's fields (``STAGE_SETTINGS["style"]``),
    ``checkpoint_every`` and ``threads`` apply; any other one set away from its default is
    refused. Saves a ``StableDiffusionPipeline``
    folder to ``out`` with the U-Net stored in half precision (as community checkpoints are
    usually shared; diffusers loads it back as float32), the log, and ``finetune.json``
    (command, base, style, settings, device, wall time, final loss). Returns the pipeline, its
    U-Net rounded as stored."""
    s = _check(settings)
    torch.set_num_threads(s.threads)
    started = time.time()
    pipe = load_pipeline(base)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution != s.resolution:
        raise SettingError(
            f"resolution: {s.resolution!r} is not allowed; the base at {base} "
            f"makes {resolution} px images"
        )
    datasets = [
        FillDataset(s.dataset_size, "train", s.resolution, s.seed, s.style),
        ShapesDataset(s.dataset_size, "train", s.resolution, s.seed, s.style),
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "log.jsonl").open("a") as log_file:

        def log(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        seconds = _train_unet(pipe, datasets, s, run_dir, log, stage="style")
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    store_half(pipe.unet, out / "unet")
    entries = _latest_entries(run_dir / "log.jsonl")
    (out / "finetune_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    losses = [e["loss"] for e in entries][-100:]
    record = {
        "command": " ".join(command or sys.argv),
        "base": str(base),
        "style": s.style,
        "settings": {
            k: v
            for k, v in dataclasses.asdict(s).items()
            if k in (*STAGE_SETTINGS["style"], "checkpoint_every", "threads")
        },
        "device": cpu_description(s.threads),
        "wall_time_s": {
            "style": round(seconds, 1),
            "this_invocation": round(time.time() - started, 1),
        },
        "trained": "unet (EMA weights, stored as float16)",
        "final": {"style_loss_last_100": float(np.mean(losses))},
    }
    (out / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    return pipe


def _check(settings: Settings) -> Settings:
    """The settings a fine-tune uses, checked; any other one set away from its default, or the
    base's own style, is refused in one line."""
    s = settings.check()
    used = (*STAGE_SETTINGS["style"], "checkpoint_every", "threads")
    refuse_unused(s, used, "a fine-tune, which trains the base's U-Net as it is")
    if s.style == "plain":
        raise SettingError(
            "style: 'plain' is not allowed for a fine-tune; expected a style the "
            f"base did not learn: {', '.join(k for k in STYLES if k != 'plain')}"
        )
    return s


def style_of(base: str | Path) -> str:
    """The palette a base folder paints in: its fine-tune's style, or "plain"."""
    record = Path(base) / "finetune.json"
    return json.loads(record.read_text())["style"] if record.exists() else "plain"
