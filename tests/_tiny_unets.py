"""Tiny Stable-Diffusion-shaped U-Nets for the ControlNet tests (built from configs, seeded)."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from cnet import ControlNet

# SD1.5's topology: 4 levels, 2 layers each, cross-attention on the first 3, conv projections,
# one head count for all levels.
SD15_TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(8, 16, 16, 32),
    layers_per_block=2,
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)
# SD2's differences: linear projections in the transformers, head counts per level,
# attention upcast.
# SD1.5's real sizes, for shape checks on the meta device (no memory, no weights)
SD15_FULL_SIZE = dict(
    SD15_TINY,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SD2_TINY = dict(
    SD15_TINY,
    block_out_channels=(8, 16, 16, 32),
    attention_head_dim=(2, 4, 4, 8),
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=32,
)


def tiny_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def unet_config(levels: int, layers: int, base: int, attention: tuple[bool, ...], **extra) -> dict:
    """An SD-like config with ``levels`` levels (channels base, 2·base, 2·base, 4·base, ...)."""
    channels = tuple(base * min(2 ** ((k + 1) // 2), 4) for k in range(levels))
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=layers,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    return {**config, **extra}


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Add seeded noise to every parameter (zero convs included), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def paired_controlnets(unet: UNet2DConditionModel, seed: int = 1):
    """diffusers' ControlNetModel.from_unet with non-zero zero convs and condition encoder, and a
    cnet ControlNet.from_unet given the same weights module by module (not through
    cnet.convert)."""
    reference = ControlNetModel.from_unet(unet).eval()
    randomize_(reference.controlnet_cond_embedding, seed)
    randomize_(reference.controlnet_down_blocks, seed + 1)
    randomize_(reference.controlnet_mid_block, seed + 2)
    ours = ControlNet.from_unet(unet).eval()
    ours.hint_encoder.load_state_dict(reference.controlnet_cond_embedding.state_dict())
    for z, theirs in zip(ours.zero_convs, reference.controlnet_down_blocks, strict=True):
        z.load_state_dict(theirs.state_dict())
    ours.mid_zero_conv.load_state_dict(reference.controlnet_mid_block.state_dict())
    return ours, reference


def inputs(unet: UNet2DConditionModel, batch: int, h: int, w: int, seed: int = 2, factor: int = 8):
    """(sample, timestep per sample, text embedding, condition in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    sample = torch.randn(batch, unet.config.in_channels, h, w, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 5, dim, generator=g)
    condition = torch.rand(batch, 3, factor * h, factor * w, generator=g)
    return sample, timestep, text, condition


def max_abs_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def tiny_sd_pipeline():
    """A randomly initialised miniature Stable Diffusion (the world's "tiny" size), seeded."""
    from cnet.world.model import (
        build_pipeline,
        build_text_encoder,
        build_tokenizer,
        build_unet,
        build_vae,
    )

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, size="tiny")
    unet = build_unet(text_encoder.config.hidden_size, size="tiny")
    return build_pipeline(build_vae(size="tiny"), text_encoder, tokenizer, unet)


def tiny_run(base, **settings) -> dict:
    """The settings of the smallest run of the real loop on a tiny base: 4 updates of batch 4
    from 16 training images, 4 evaluation conditions sampled in 2 steps; ``settings`` add to
    them or replace them."""
    smallest = dict(base=str(base), steps=4, batch_size=4, train_size=16, eval_size=4, eval_steps=2)
    return {**smallest, **settings}
