"""cnet: ControlNet, equation by equation, on top of diffusers.

Each equation of Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models" (ICCV 2023) is one short, named function or class; grep for ``Eq. N`` to find it.
Equation numbers are those of arXiv v1; a section number names its version ("ICCV §3.2").

The package is built in layers, each importing only those below it:

* the math core: :mod:`cnet.zero_conv` (Eq. 5–8), :mod:`cnet.block` (Eq. 1–4),
  :mod:`cnet.hint` (Eq. 9), :mod:`cnet.controlnet` (ICCV §3.2), :mod:`cnet.injection`,
  :mod:`cnet.convert` (official and diffusers layouts), the methods that followed:
  :mod:`cnet.adapter` (T2I-Adapter), :mod:`cnet.controlnet_xs` (ControlNet-XS) and
  :mod:`cnet.concat` (channel concatenation), and :mod:`cnet.sample`;
* :mod:`cnet.train` (training on a locked base) and :mod:`cnet.world` (the miniature Stable
  Diffusion world);
* :mod:`cnet.course`: what the notebooks call (lessons, plots, widgets, figures).
"""

import os as _os
from importlib import import_module as _import_module
from typing import TYPE_CHECKING as _TYPE_CHECKING

# diffusers' pipelines import transformers' image processors, which announce on stderr that
# torchvision is not installed (cnet needs none of them). transformers reads its verbosity once,
# at import: errors only, unless the environment already chose.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .block import ControlledBlock, lock, trainable_copy
from .residuals import ControlResiduals, cfg_resolution_weights, control_scales, guess_mode_scales
from .zero_conv import ZeroConv2d, sgd_step, zero_conv, zero_conv_grads

# The rest of the core sits on diffusers, whose import takes seconds: it is loaded on first use,
# so that the notebooks on the zero convolution and the block (torch only) start at once.
_ON_FIRST_USE = {
    "AdaptedUNet": "adapter",
    "t2i_adapter_for": "adapter",
    "ConcatenatedUNet": "concat",
    "concat_unet_for": "concat",
    "ControlNetXSUNet": "controlnet_xs",
    "controlnet_xs_for": "controlnet_xs",
    "ControlNet": "controlnet",
    "unet_skip_channels": "controlnet",
    "from_diffusers": "convert",
    "from_official": "convert",
    "load_official_state_dict": "convert",
    "read_official_weights": "convert",
    "save_official": "convert",
    "to_diffusers": "convert",
    "to_official_state_dict": "convert",
    "PaperHintEncoder": "hint",
    "ReleasedHintEncoder": "hint",
    "make_hint_encoder": "hint",
    "ControlledUNet": "injection",
    "inject_residuals": "injection",
}

if _TYPE_CHECKING:  # what the names above are, for type checkers and the layout test
    from .adapter import AdaptedUNet, t2i_adapter_for
    from .concat import ConcatenatedUNet, concat_unet_for
    from .controlnet import ControlNet, unet_skip_channels
    from .controlnet_xs import ControlNetXSUNet, controlnet_xs_for
    from .convert import (
        from_diffusers,
        from_official,
        load_official_state_dict,
        read_official_weights,
        save_official,
        to_diffusers,
        to_official_state_dict,
    )
    from .hint import PaperHintEncoder, ReleasedHintEncoder, make_hint_encoder
    from .injection import ControlledUNet, inject_residuals


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'cnet' has no attribute {name!r}")
    value = getattr(_import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_ON_FIRST_USE])


__version__ = "0.1.0"

__all__ = [
    "AdaptedUNet",
    "ConcatenatedUNet",
    "ControlNet",
    "ControlNetXSUNet",
    "ControlResiduals",
    "ControlledBlock",
    "ControlledUNet",
    "PaperHintEncoder",
    "ReleasedHintEncoder",
    "cfg_resolution_weights",
    "concat_unet_for",
    "controlnet_xs_for",
    "control_scales",
    "from_diffusers",
    "from_official",
    "guess_mode_scales",
    "inject_residuals",
    "load_official_state_dict",
    "make_hint_encoder",
    "read_official_weights",
    "save_official",
    "to_diffusers",
    "to_official_state_dict",
    "t2i_adapter_for",
    "unet_skip_channels",
    "ZeroConv2d",
    "lock",
    "sgd_step",
    "trainable_copy",
    "zero_conv",
    "zero_conv_grads",
]
