r"""Injection into the locked U-Net: the paper's ICCV §3.2, at full scale, for one or several
ControlNets.

The ControlNet's residuals :math:`r_0 \dots r_{12}` enter the locked U-Net through its own
forward (diffusers' ``down_block_additional_residuals`` and ``mid_block_additional_residual``):

.. math:: \text{skip}_i \leftarrow \text{skip}_i + \sum_k s^{(k)}_i\, r^{(k)}_i, \qquad
          \text{mid} \leftarrow \text{mid} + \sum_k s^{(k)}_{12}\, r^{(k)}_{12}

with one scale per residual and ControlNet. Several ControlNets compose by adding their
scaled residuals, with no extra weighting (ICCV §3.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .block import lock
from .controlnet import ControlNet, unet_skip_channels
from .hint import EncodedCondition
from .residuals import ControlResiduals, GuessRule

__all__ = ["ControlledUNet", "inject_residuals"]


def inject_residuals(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    residuals: ControlResiduals | None,
    only_mid_control: bool = False,
    **unet_kwargs: Any,
) -> torch.Tensor:
    r"""Run the U-Net with the ControlNet residuals added: :math:`\text{skip}_i + r_i` into the
    decoder and :math:`\text{mid} + r_{12}`, through the U-Net's own forward
    (``down_block_additional_residuals``, ``mid_block_additional_residual``).

    ``only_mid_control`` (released code, ``ControlLDM.only_mid_control``) adds the middle
    residual alone. ``residuals=None`` runs the plain U-Net. Returns the U-Net's output sample.
    """
    if residuals is None:
        return unet(sample, timestep, encoder_hidden_states, **unet_kwargs).sample
    channels = unet_skip_channels(unet)
    got = [r.shape[1] for r in residuals.down]
    if got != channels:
        raise ValueError(
            f"residuals: expected {len(channels)} skip residuals with channels {channels} "
            f"(+1 middle), got {len(got)} with channels {got}"
        )
    mid_channels = unet.mid_block.resnets[-1].out_channels
    if residuals.mid.shape[1] != mid_channels:
        raise ValueError(
            f"residuals.mid: expected {mid_channels} channels, got {tuple(residuals.mid.shape)}"
        )
    down = residuals.down
    if only_mid_control:
        # Adding exact zeros leaves every skip connection bit-identical.
        down = tuple(torch.zeros_like(r) for r in down)
    return unet(
        sample,
        timestep,
        encoder_hidden_states,
        down_block_additional_residuals=down,
        mid_block_additional_residual=residuals.mid,
        **unet_kwargs,
    ).sample


def _per_controlnet(value: Any, k: int, name: str) -> list[Any]:
    """One entry per ControlNet: ``value`` as is for one ControlNet, else a sequence of k."""
    if k == 1:
        return [value]
    if isinstance(value, (int, float)):
        return [value] * k
    if len(value) != k:
        raise ValueError(f"{name}: expected one entry per ControlNet ({k}), got {len(value)}")
    return list(value)


class ControlledUNet(nn.Module):
    r"""The locked U-Net with one or several ControlNets injected (ICCV §3.2, Eq. 2 at full scale).

    ``unet`` is locked in place (:func:`cnet.lock`); each ControlNet's residuals are scaled
    (its own scale), added together (composition: several ControlNets simply add), and fed
    into the U-Net's skip connections and middle block by :func:`inject_residuals`.
    """

    def __init__(self, unet: UNet2DConditionModel, controlnets: ControlNet | Sequence[ControlNet]):
        super().__init__()
        nets = [controlnets] if isinstance(controlnets, ControlNet) else list(controlnets)
        if not nets:
            raise ValueError("expected at least one ControlNet")
        channels = tuple(unet_skip_channels(unet))
        for k, net in enumerate(nets):
            if net.skip_channels != channels:
                raise ValueError(
                    f"ControlNet {k} gives residuals with channels {list(net.skip_channels)}; "
                    f"this U-Net's skip connections expect {list(channels)}"
                )
        self.unet = lock(unet)
        self.controlnets = nn.ModuleList(nets)

    @property
    def n_residuals(self) -> int:
        return self.controlnets[0].n_residuals

    def residuals(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditions: torch.Tensor | EncodedCondition | Sequence[torch.Tensor | EncodedCondition],
        scales: float | Sequence[float] | Sequence[float | Sequence[float]] = 1.0,
        guess_mode: bool = False,
        guess_rule: GuessRule = "released",
        control_mask: torch.Tensor | None = None,
    ) -> ControlResiduals:
        r"""The summed residuals :math:`\sum_k s^{(k)} \odot r^{(k)}` of all ControlNets.

        ``conditions``: one condition image, or one per ControlNet. ``scales``: for one
        ControlNet a number or one per residual; for several, one entry (number or per-residual
        list) per ControlNet, or a single number for all. ``guess_mode`` multiplies in
        :func:`guess_mode_scales`. ``control_mask`` (N,) bool: samples that get control; the
        ControlNets run on those only and the others get zero residuals (guess mode with
        classifier-free guidance: no control on the unconditional half).
        """
        k = len(self.controlnets)
        if isinstance(conditions, (torch.Tensor, EncodedCondition)):
            conditions = [conditions]
        if len(conditions) != k:
            raise ValueError(
                f"conditions: expected one per ControlNet ({k}), got {len(conditions)}"
            )
        per_net_scales = _per_controlnet(scales, k, "scales")
        if control_mask is not None:
            if control_mask.dtype != torch.bool or tuple(control_mask.shape) != (sample.shape[0],):
                raise ValueError(
                    f"control_mask: expected a bool tensor of shape ({sample.shape[0]},), got "
                    f"{control_mask.dtype} {tuple(control_mask.shape)}"
                )
            if torch.is_tensor(timestep) and timestep.dim() == 1 and timestep.shape[0] > 1:
                timestep = timestep[control_mask]
            sample, encoder_hidden_states = (
                sample[control_mask],
                encoder_hidden_states[control_mask],
            )
            conditions = [c[control_mask] for c in conditions]
        total = None
        for net, condition, scale in zip(self.controlnets, conditions, per_net_scales):
            r = net.residuals(
                sample, timestep, encoder_hidden_states, condition, scale, guess_mode, guess_rule
            )
            total = r if total is None else total + r
        return total if control_mask is None else total.scattered(control_mask)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditions: torch.Tensor | Sequence[torch.Tensor],
        scales: float | Sequence[float] | Sequence[float | Sequence[float]] = 1.0,
        guess_mode: bool = False,
        guess_rule: GuessRule = "released",
        only_mid_control: bool = False,
        control_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The controlled U-Net's output :math:`y_c` (the noise prediction). See
        :meth:`residuals` for the arguments and :func:`inject_residuals` for
        ``only_mid_control``."""
        residuals = self.residuals(
            sample,
            timestep,
            encoder_hidden_states,
            conditions,
            scales,
            guess_mode,
            guess_rule,
            control_mask,
        )
        return inject_residuals(
            self.unet, sample, timestep, encoder_hidden_states, residuals, only_mid_control
        )
