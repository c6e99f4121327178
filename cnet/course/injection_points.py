"""The 12 + 1 places a ControlNet's residuals enter the locked U-Net, with their shapes: the table
and diagram of notebook 03."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..controlnet import unet_residual_names

__all__ = ["InjectionPoint", "injection_points"]


@dataclass(frozen=True)
class InjectionPoint:
    """One of the 12 + 1 places a residual enters the locked U-Net."""

    index: int
    encoder: str  # the module whose output is copied and zero-convolved (diffusers' name)
    decoder: str  # where the residual is added in the locked U-Net
    official: str  # the zero conv's name in the official checkpoints
    channels: int
    height: int
    width: int


def injection_points(
    unet: UNet2DConditionModel, latent_size: int | tuple[int, int] | None = None
) -> list[InjectionPoint]:
    """The U-Net's skip connections and middle block with their shapes for ``latent_size``
    (default: its ``sample_size``), from one forward pass on zeros (free on the meta device).
    """
    size = latent_size if latent_size is not None else unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    param = unet.conv_in.weight
    shapes: list[tuple[int, ...]] = []

    def skip_hook(module: nn.Module, args: Any, output: Any) -> None:
        if module is unet.conv_in:
            shapes.append(tuple(output.shape))
        elif module is unet.mid_block:
            shapes.append(tuple(output.shape))
        else:
            shapes.extend(tuple(s.shape) for s in output[1])

    hooks = [
        m.register_forward_hook(skip_hook)
        for m in (unet.conv_in, *unet.down_blocks, unet.mid_block)
    ]
    try:
        dim = unet.config.cross_attention_dim
        dim = dim if isinstance(dim, int) else dim[0]
        with torch.no_grad():
            unet(
                torch.zeros(
                    1, unet.config.in_channels, h, w, device=param.device, dtype=param.dtype
                ),
                0,
                torch.zeros(1, 1, dim, device=param.device, dtype=param.dtype),
            )
    finally:
        for hook in hooks:
            hook.remove()
    # The decoder consumes skips from the last one back: up block by up block, resnet by resnet.
    consumers = [
        f"up_blocks.{u}.resnets.{j} (skip)"
        for u, block in enumerate(unet.up_blocks)
        for j in range(len(block.resnets))
    ][::-1]
    encoders = unet_residual_names(unet)
    decoders = [*consumers, "mid_block (output)"]
    n = len(encoders)
    officials = [f"zero_convs.{i}" for i in range(n - 1)] + ["middle_block_out"]
    return [
        InjectionPoint(i, encoders[i], decoders[i], officials[i], s[1], s[2], s[3])
        for i, s in enumerate(shapes)
    ]
