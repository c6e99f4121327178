"""The two models of a run: the locked base it controls and what it trains on it, by ``method``:
a ControlNet; a T2I-Adapter (:mod:`cnet.adapter`); a ControlNet-XS (:mod:`cnet.controlnet_xs`);
or, with ``concat``, a copy of the whole U-Net that takes the condition's latent as extra input
channels (:mod:`cnet.concat`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    ControlNetXSAdapter,
    StableDiffusionPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from torch import nn

from ..adapter import AdaptedUNet, t2i_adapter_for
from ..block import lock
from ..concat import ConcatenatedUNet, concat_unet_for
from ..controlnet import ControlNet
from ..controlnet_xs import ControlNetXSUNet, controlnet_xs_for
from ..injection import ControlledUNet
from ..variants import make_lite, replace_connections
from ..world.model import load_pipeline
from .config import TrainConfig

__all__ = [
    "build_adapter",
    "build_controlnet",
    "build_trained",
    "controlled_by",
    "load_base",
    "trained_name",
]


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


def build_adapter(pipe: StableDiffusionPipeline, config: TrainConfig) -> T2IAdapter:
    """The T2I-Adapter a run with ``method`` t2i-adapter trains: diffusers' full adapter sized
    for the base's U-Net and image resolution (:func:`cnet.t2i_adapter_for`), its random weights
    drawn from torch's generator (which the Trainer seeds with the run's seed)."""
    return t2i_adapter_for(pipe.unet, pipe.unet.config.sample_size * pipe.vae_scale_factor)


def build_trained(pipe: StableDiffusionPipeline, config: TrainConfig) -> nn.Module:
    """What a run trains, by its ``method`` (random weights from torch's generator, which the
    Trainer seeds with the run's seed): a ControlNet; diffusers' ``T2IAdapter`` or
    ``ControlNetXSAdapter`` sized for the base's U-Net; or the concatenating U-Net, a copy of
    the base's (diffusers' ``UNet2DConditionModel``)."""
    if config.method == "t2i-adapter":
        return build_adapter(pipe, config)
    if config.method == "controlnet-xs":
        return controlnet_xs_for(pipe.unet)
    if config.method == "concat":
        return concat_unet_for(pipe.unet)
    return build_controlnet(pipe, config)


#: The name a run's checkpoint (and its export's folder) gives what a run of each method trains.
TRAINED_NAMES = {
    "controlnet": "controlnet",
    "t2i-adapter": "adapter",
    "controlnet-xs": "controlnet_xs",
    "concat": "concat_unet",
}


def trained_name(method: str) -> str:
    """The name a run's checkpoint gives what a run of ``method`` trains
    (:data:`TRAINED_NAMES`)."""
    return TRAINED_NAMES[method]


def controlled_by(
    pipe: StableDiffusionPipeline, trained: nn.Module | Sequence[nn.Module]
) -> nn.Module:
    """The base's locked U-Net with what a run trains on it, all called alike
    (``(z_t, t, text, condition, scales)``): a :class:`~cnet.ControlledUNet` for a ControlNet,
    an :class:`~cnet.AdaptedUNet` for a T2I-Adapter, a :class:`~cnet.ControlNetXSUNet` for a
    ControlNet-XS, and for the concatenating U-Net a :class:`~cnet.ConcatenatedUNet` (which
    replaces the locked U-Net and encodes the condition with the base's VAE). Several
    ControlNets or several adapters (a list) compose, a condition each."""
    if isinstance(trained, (list, tuple)):
        if all(isinstance(t, T2IAdapter) for t in trained):
            return AdaptedUNet(pipe.unet, trained)
        if all(isinstance(t, ControlNet) for t in trained):
            return ControlledUNet(pipe.unet, list(trained))
        raise ValueError(
            "trained: several are allowed only as ControlNets or as T2I-Adapters (diffusers "
            "composes no other method's models)"
        )
    if isinstance(trained, T2IAdapter):
        return AdaptedUNet(pipe.unet, trained)
    if isinstance(trained, ControlNetXSAdapter):
        return ControlNetXSUNet(pipe.unet, trained)
    if isinstance(trained, UNet2DConditionModel):
        return ConcatenatedUNet(trained, pipe.vae)
    return ControlledUNet(pipe.unet, trained)
