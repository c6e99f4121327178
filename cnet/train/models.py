"""The two models of a run: the locked base it controls and the ControlNet it trains."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..block import lock
from ..controlnet import ControlNet
from ..variants import make_lite, replace_connections
from ..world.model import load_pipeline
from .config import TrainConfig

__all__ = ["build_controlnet", "load_base"]


def load_base(path: str | Path, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """Load a diffusers ``StableDiffusionPipeline`` (:func:`cnet.world.model.load_pipeline`: a
    folder, offline, or a hub id) and lock VAE, text encoder and U-Net (:func:`cnet.lock`)."""
    pipe = load_pipeline(path, device)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        lock(part)
    return pipe


def build_controlnet(pipe: StableDiffusionPipeline, config: TrainConfig) -> ControlNet:
    """The ControlNet a run trains: a trainable copy of the base's U-Net (ICCV §3.2) whose condition
    encoder downsamples the base's image resolution to its latent resolution; or one of the
    paper's ablations of it (``connections``, ``trainable_copy``: :mod:`cnet.variants`)."""
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    controlnet = ControlNet.from_unet(
        pipe.unet, hint_encoder=config.hint_encoder, condition_size=resolution
    )
    if config.trainable_copy == "lite":
        make_lite(controlnet)
    # the ablations' random weights come from the run's seed, as the condition encoder's do
    generator = torch.Generator().manual_seed(config.seed)
    std = config.connection_std or None  # 0: by gain
    return replace_connections(
        controlnet, config.connections, config.connection_gain, generator, std
    )
