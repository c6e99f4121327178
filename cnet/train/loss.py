r"""The training objective (ICCV §3.3): the base's own diffusion loss, with control.

The locked base was trained to predict the noise (SD1.x; SD2's 768 px models the velocity); the
ControlNet learns by regressing the same target through the controlled U-Net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..injection import ControlledUNet
from ..settings import SettingError

__all__ = ["diffusion_loss"]


def diffusion_loss(
    controlled: ControlledUNet, batch: dict, noise_scheduler: DDPMScheduler, scaling_factor: float
) -> torch.Tensor:
    r"""The ε-prediction loss with control: :math:`\lVert \epsilon - \epsilon_\theta(z_t, t, c_t,
    c_f)\rVert^2`, :math:`z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`
    (diffusers' ``DDPMScheduler.add_noise``), :math:`z_0` the VAE latent times the VAE's
    ``scaling_factor``, as Stable Diffusion was trained. A base that predicts another target
    (its scheduler's ``prediction_type``: SD2's v-prediction) regresses that one instead."""
    z0 = batch["latents"] * scaling_factor
    zt = noise_scheduler.add_noise(z0, batch["noise"], batch["timesteps"])
    prediction = controlled(zt, batch["timesteps"], batch["embeddings"], batch["condition"])
    return F.mse_loss(prediction.float(), _target(noise_scheduler, z0, batch).float())


def _target(noise_scheduler: DDPMScheduler, z0: torch.Tensor, batch: dict) -> torch.Tensor:
    r"""What the base predicts, by its scheduler's ``prediction_type``: the noise (SD1.x), the
    velocity :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\, z_0`
    (SD2's 768 px models), or the clean latent."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return batch["noise"]
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(z0, batch["noise"], batch["timesteps"])
    if kind == "sample":
        return z0
    raise SettingError(
        f"base: prediction_type {kind!r} is not allowed; expected epsilon, v_prediction or sample"
    )
