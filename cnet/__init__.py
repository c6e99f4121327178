"""cnet: ControlNet, equation by equation, on top of diffusers.

Each equation of Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models" (ICCV 2023) is one short, named function or class; grep for ``Eq. N`` to find it.
"""

from .block import ControlledBlock, lock, trainable_copy
from .zero_conv import ZeroConv2d, sgd_step, zero_conv, zero_conv_grads

__version__ = "0.1.0"

__all__ = [
    "ControlledBlock",
    "ZeroConv2d",
    "lock",
    "sgd_step",
    "trainable_copy",
    "zero_conv",
    "zero_conv_grads",
]
