"""cnet: ControlNet, equation by equation, on top of diffusers.

Each equation of Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models" (ICCV 2023) is one short, named function or class; grep for ``Eq. N`` to find it.
"""

from .block import ControlledBlock, lock, trainable_copy
from .controlnet import (
    ControlledUNet,
    ControlNet,
    ControlResiduals,
    InjectionPoint,
    control_scales,
    guess_mode_scales,
    inject_residuals,
    injection_points,
    unet_skip_channels,
)
from .convert import (
    load_official_state_dict,
    read_checkpoint,
    save_official,
    to_official_state_dict,
)
from .hint import PaperHintEncoder, ReleasedHintEncoder, make_hint_encoder
from .zero_conv import ZeroConv2d, sgd_step, zero_conv, zero_conv_grads

__version__ = "0.1.0"

__all__ = [
    "ControlNet",
    "ControlResiduals",
    "ControlledBlock",
    "ControlledUNet",
    "InjectionPoint",
    "PaperHintEncoder",
    "ReleasedHintEncoder",
    "control_scales",
    "guess_mode_scales",
    "inject_residuals",
    "injection_points",
    "load_official_state_dict",
    "make_hint_encoder",
    "read_checkpoint",
    "save_official",
    "to_official_state_dict",
    "unet_skip_channels",
    "ZeroConv2d",
    "lock",
    "sgd_step",
    "trainable_copy",
    "zero_conv",
    "zero_conv_grads",
]
