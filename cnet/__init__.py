"""cnet: ControlNet, equation by equation, on top of diffusers.

Each equation of Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models" (ICCV 2023) is one short, named function or class; grep for ``Eq. N`` to find it.

The package is built in layers, each importing only those below it:

* the math core: :mod:`cnet.zero_conv` (Eq. 5–8), :mod:`cnet.block` (Eq. 1–4),
  :mod:`cnet.hint` (Eq. 9), :mod:`cnet.controlnet` (§3.2), :mod:`cnet.injection`,
  :mod:`cnet.convert` (official and diffusers layouts), :mod:`cnet.sample`;
* :mod:`cnet.train` (training on a locked base) and :mod:`cnet.world` (the miniature Stable
  Diffusion world);
* :mod:`cnet.course`: what the notebooks call (lessons, plots, widgets, figures).
"""

from .block import ControlledBlock, lock, trainable_copy
from .controlnet import ControlNet, unet_skip_channels
from .convert import (
    from_diffusers,
    from_official,
    load_official_state_dict,
    read_checkpoint,
    save_official,
    to_diffusers,
    to_official_state_dict,
)
from .hint import PaperHintEncoder, ReleasedHintEncoder, make_hint_encoder
from .injection import ControlledUNet, inject_residuals
from .residuals import ControlResiduals, cfg_resolution_weights, control_scales, guess_mode_scales
from .zero_conv import ZeroConv2d, sgd_step, zero_conv, zero_conv_grads

__version__ = "0.1.0"

__all__ = [
    "ControlNet",
    "ControlResiduals",
    "ControlledBlock",
    "ControlledUNet",
    "PaperHintEncoder",
    "ReleasedHintEncoder",
    "cfg_resolution_weights",
    "control_scales",
    "from_diffusers",
    "from_official",
    "guess_mode_scales",
    "inject_residuals",
    "load_official_state_dict",
    "make_hint_encoder",
    "read_checkpoint",
    "save_official",
    "to_diffusers",
    "to_official_state_dict",
    "unet_skip_channels",
    "ZeroConv2d",
    "lock",
    "sgd_step",
    "trainable_copy",
    "zero_conv",
    "zero_conv_grads",
]
