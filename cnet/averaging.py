"""A running average of a module's weights (an exponential moving average, EMA), below everything
that trains with one: the world's pretraining (what ships of the base) and ControlNet training
(what its evaluations sample, with ``ema_decay`` > 0).

The average is diffusers' ``EMAModel``; its weights live in a locked copy of the module, so a
checkpoint stores them as a module (``ema_<name>``) and a resume restores them the same way.
"""

from __future__ import annotations

import copy

from diffusers.training_utils import EMAModel
from torch import nn

from .block import lock

__all__ = ["averaged_copy"]


def averaged_copy(module: nn.Module, decay: float) -> tuple[nn.Module, EMAModel]:
    r"""A locked copy of ``module`` and the ``EMAModel`` that averages ``module``'s weights into
    it, in place, at each ``ema.step(module.parameters())``:
    :math:`\bar\theta \leftarrow d_k \bar\theta + (1 - d_k)\,\theta` with
    :math:`d_k = \min(\text{decay}, (1 + k) / (10 + k))` (diffusers' warm-up: early on, a decay
    near 1 would keep most of the initial weights in the average; the first update copies).
    A resumed run sets ``ema.optimization_step`` to the updates already averaged, once its
    checkpoint has restored the copy, so the warm-up continues where it was. The copy keeps the
    module's memory format (channels-last stays channels-last)."""
    averaged = lock(copy.deepcopy(module))
    ema = EMAModel(averaged.parameters(), decay=decay)
    ema.shadow_params = list(averaged.parameters())  # averaged into the copy's own weights
    return averaged, ema
