"""The training data, with the frozen work done once (the base it is encoded with:
:mod:`cnet.train.models`).

The VAE's latent distribution (mean, std) of every training image and the text embedding of
every distinct prompt are computed before the first step (:func:`cache_data`); each step then
draws its batch from that cache with a generator seeded by ``(seed, step, micro-batch)`` alone
(:func:`draw_batch`), which is what makes a resumed run equal the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from ..world.data import FillDataset, ShapesDataset
from .config import TASKS, SettingError, TrainConfig

__all__ = [
    "CachedData",
    "cache_data",
    "condition_images",
    "draw_batch",
    "step_generator",
    "task_dataset",
]


def task_dataset(
    task: str, size: int, split: str, resolution: int, seed: int, style: str = "plain"
):
    """The world's dataset a task trains on: Fill, or Shapes for one of its conditions, painted
    in ``style``'s palette."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    cls = FillDataset if task == "fill" else ShapesDataset
    return cls(size=size, split=split, resolution=resolution, seed=seed, style=style)


def _condition_key(task: str) -> str:
    return "outline" if task == "fill" else task


# The VAE encodes this many images at a time: at 64 px a larger batch's activations outgrow
# the CPU's cache and encode at half the speed (on the CPU the latents are the same bit for bit).
VAE_CHUNK = 32


@dataclass
class CachedData:
    """What the frozen networks make of a dataset, computed once: the VAE's latent mean and std
    per image, the condition images, and one text embedding per distinct prompt."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    condition: torch.Tensor  # (N, 3, H, W) condition images in [0, 1]
    prompt_index: torch.Tensor  # (N,) index into `embeddings`; index 0 is the empty prompt
    embeddings: torch.Tensor  # (P, L, D)
    prompts: list[str]  # the distinct prompts, prompts[0] == ""
    extras: dict = field(default_factory=dict)  # evaluation ground truth (masks, colours)


@torch.no_grad()
def cache_data(
    pipe: StableDiffusionPipeline,
    task: str,
    size: int,
    split: str,
    seed: int,
    chunk: int = 256,
    style: str = "plain",
) -> CachedData:
    """Render ``size`` samples of ``task`` (in ``style``'s palette, which fidelity is then
    measured in) and push them through the frozen VAE and text encoder once."""
    device = pipe.unet.device
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = task_dataset(task, size, split, resolution, seed, style)
    key = _condition_key(task)
    means, stds, conditions, prompts_all, layers, fg, bg = [], [], [], [], [], [], []
    for start in range(0, size, chunk):
        indices = list(range(start, min(size, start + chunk)))
        batch = dataset.batch(indices)
        scenes = dataset.scenes(indices)
        images = batch["image"].to(device, pipe.vae.dtype)
        for part in images.split(VAE_CHUNK):
            dist = pipe.vae.encode(part).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        conditions.append(batch[key].float())
        prompts_all += batch["prompt"]
        layers.append(batch["layers"])
        fg.append(torch.from_numpy(scenes.colour[:, 0].copy()))
        bg.append(torch.from_numpy(scenes.background.copy()))
    distinct = [""] + sorted(set(prompts_all) - {""})
    lookup = {p: i for i, p in enumerate(distinct)}
    embeddings = torch.cat(
        [
            pipe.encode_prompt(distinct[i : i + chunk], device, 1, False)[0].float().cpu()
            for i in range(0, len(distinct), chunk)
        ]
    )
    return CachedData(
        latent_mean=torch.cat(means),
        latent_std=torch.cat(stds),
        condition=torch.cat(conditions),
        embeddings=embeddings,
        prompts=distinct,
        prompt_index=torch.tensor([lookup[p] for p in prompts_all]),
        extras={
            "region": torch.cat(layers) > 0,
            "foreground": torch.cat(fg),
            "background": torch.cat(bg),
            "prompt": prompts_all,
            "style": style,
        },
    )


def condition_images(task: str, size: int, seed: int, resolution: int) -> torch.Tensor:
    """The evaluation set's condition images (what :func:`cache_data` stores), without a model."""
    dataset = task_dataset(task, size, "eval", resolution, seed)
    return dataset.batch(list(range(size)))[_condition_key(task)].float()


def step_generator(seed: int, draw: int) -> torch.Generator:
    """The single source of randomness of one micro-batch: a function of (seed, draw) only,
    the key to exact resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw)


def draw_timesteps(
    sampling: str, size: int, num_train_timesteps: int, generator: torch.Generator
) -> torch.Tensor:
    r"""The timesteps of one micro-batch. ``uniform``: :math:`t \sim U\{0, \dots, T-1\}`, as SD,
    the released ControlNet and diffusers' ``train_controlnet.py`` train. ``cubic``:
    :math:`t = \lfloor (1 - u^3)\, T \rfloor`, :math:`u \sim U[0, 1)`, T2I-Adapter's non-uniform
    sampling (Mou et al., arXiv 2302.08453 §3.4; diffusers' ``train_t2i_adapter_sdxl.py``):
    :math:`0.5^{1/3}` = 79 % of the draws fall in the noisier half, where, by that paper's
    argument, the layout of the image is decided (an argument cnet has not measured)."""
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (size,), generator=generator)
    if sampling == "cubic":
        u = torch.rand(size, generator=generator, dtype=torch.float64)
        return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    raise SettingError(f"timesteps: {sampling!r} is not allowed; expected one of uniform, cubic")


def draw_batch(
    data: CachedData,
    config: TrainConfig,
    step: int,
    micro: int,
    noise_scheduler: DDPMScheduler,
    device: torch.device | str = "cpu",
) -> dict:
    """Micro-batch ``micro`` of optimizer step ``step``: ``batch_size`` samples drawn with
    replacement, a latent drawn from each one's cached distribution, noise, a timestep
    (:func:`draw_timesteps`: uniform over the scheduler's range unless the settings say
    otherwise), and the empty prompt in place of the caption with probability
    ``empty_prompt_ratio``. Every (step, micro) pair has its own draw number, so no two
    micro-batches of a run share their randomness."""
    g = step_generator(config.seed, step * config.grad_accum + micro)
    n = len(data.prompt_index)
    idx = torch.randint(0, n, (config.batch_size,), generator=g)
    mean = data.latent_mean[idx]  # read once: a folder's rows come from disk
    latents = mean + data.latent_std[idx] * torch.randn(mean.shape, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = draw_timesteps(
        config.timesteps, config.batch_size, noise_scheduler.config.num_train_timesteps, g
    )
    keep_prompt = torch.rand(config.batch_size, generator=g) >= config.empty_prompt_ratio
    prompt_index = torch.where(keep_prompt, data.prompt_index[idx], 0)
    return {
        "latents": latents.to(device),
        "noise": noise.to(device),
        "timesteps": timesteps.to(device),
        "embeddings": data.embeddings[prompt_index].to(device),
        "condition": data.condition[idx].to(device),
        "prompt_index": prompt_index,
    }
