"""What the benchmarks run: U-Nets of Stable Diffusion 1.5's topology at a chosen width, the
shipped miniature base, SD's VAE and text encoder at full size (random weights: their cost does
not depend on the values), and one training step of each kind on them.

The two steps compared are the two ways to adapt SD to a condition:

* **ControlNet** (ICCV §3.2): the locked U-Net and the trainable copy; AdamW over the ControlNet.
* **Fine-tuning**: the whole U-Net trains; AdamW over all of it.

Both use the same batch, the same loss and the same optimizer settings as the training loop
(:mod:`cnet.train.loop`), so the ratio of their costs is the ratio of what they compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..controlnet import ControlNet
from ..injection import ControlledUNet
from ..train.loss import diffusion_loss

__all__ = [
    "Batch",
    "Step",
    "controlnet_step",
    "finetune_step",
    "make_batch",
    "sd15_text_encoder",
    "sd15_unet",
    "sd15_vae",
]

SD15_CHANNELS = (320, 640, 1280, 1280)


def sd15_unet(width: float = 1.0, sample_size: int = 64, seed: int = 0) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with SD1.5's configuration (4 levels, 2 layers each, cross-
    attention at the first three, 8 heads, 768-dim text), its channels scaled by ``width``
    (1.0 is SD1.5 itself, 859.5M parameters). Group norms of 8 groups below full width, where
    SD's 32 no longer divide the channels."""
    torch.manual_seed(seed)
    channels = tuple(int(c * width) for c in SD15_CHANNELS)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=channels,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32 if width == 1.0 else 8,
    )


def sd15_vae(seed: int = 0) -> AutoencoderKL:
    """SD's VAE configuration (128, 256, 512, 512 channels, 8x, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )


def sd15_text_encoder(seed: int = 0) -> CLIPTextModel:
    """SD1.5's text encoder configuration (CLIP ViT-L/14's: 12 layers, 768 wide, 77 tokens)."""
    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )


@dataclass
class Batch:
    """One training batch, already in latent space (what the loop's cache hands a step)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor
    condition: torch.Tensor

    def as_dict(self) -> dict:
        return vars(self)


def make_batch(
    unet: UNet2DConditionModel,
    batch_size: int,
    latent_size: int,
    text_length: int = 77,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, unet.config.in_channels, latent_size, latent_size)
    dim = unet.config.cross_attention_dim
    return Batch(
        latents=torch.randn(shape, generator=g).to(device),
        noise=torch.randn(shape, generator=g).to(device),
        timesteps=torch.randint(0, 1000, (batch_size,), generator=g).to(device),
        embeddings=torch.randn(batch_size, text_length, dim, generator=g).to(device),
        condition=torch.rand(batch_size, 3, 8 * latent_size, 8 * latent_size, generator=g).to(
            device
        ),
    )


@dataclass
class Step:
    """One training step to time: ``run()`` does zero_grad, forward, backward, update.
    ``modules`` and ``optimizer`` are what lives in memory while it runs."""

    run: Callable[[], float]
    modules: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    trainable_parameters: int


def _adamw(parameters, device: torch.device) -> torch.optim.AdamW:
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(parameters, lr=1e-5, **fast)


def controlnet_step(unet: UNet2DConditionModel, batch: Batch, precision: str | None = None) -> Step:
    """The ControlNet step of :mod:`cnet.train.loop`: locked U-Net, trainable copy."""
    device = unet.device
    controlnet = ControlNet.from_unet(unet, condition_size=8 * batch.latents.shape[-1])
    controlled = ControlledUNet(unet, controlnet.to(device)).train()
    optimizer = _adamw(controlnet.parameters(), device)
    scheduler = DDPMScheduler()

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = diffusion_loss(controlled, batch.as_dict(), scheduler, 1.0)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Step(run, [controlled], optimizer, sum(p.numel() for p in controlnet.parameters()))


def finetune_step(unet: UNet2DConditionModel, batch: Batch, precision: str | None = None) -> Step:
    """Fine-tuning the whole U-Net on the same batch and loss (no condition: fine-tuning SD)."""
    device = unet.device
    unet.requires_grad_(True).train()
    optimizer = _adamw(unet.parameters(), device)
    scheduler = DDPMScheduler()

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        zt = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        with _autocast(device, precision):
            eps = unet(zt, batch.timesteps, batch.embeddings).sample
        loss = F.mse_loss(eps.float(), batch.noise.float())
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Step(run, [unet], optimizer, sum(p.numel() for p in unet.parameters()))


def _autocast(device: torch.device, precision: str | None):
    if precision in (None, "no"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(
        device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    )
