r"""Locked block, trainable copy, zero convolutions: the paper's Eq. 1–4 (ICCV §3.1).

A neural block :math:`F(\cdot; \Theta)` maps a feature map :math:`x` to :math:`y = F(x; \Theta)`
(**Eq. 1**). ControlNet *locks* :math:`\Theta`, *clones* it into a trainable copy
:math:`\Theta_c`, and joins the two with zero convolutions :math:`Z(\cdot; \Theta_{z1})` and
:math:`Z(\cdot; \Theta_{z2})` so that the copy can see an external condition :math:`c`
(**Eq. 2**):

.. math:: y_c = F(x; \Theta) + Z\big(F(x + Z(c; \Theta_{z1}); \Theta_c); \Theta_{z2}\big)

At initialisation both zero convolutions output exactly 0 (**Eq. 3**), so :math:`y_c = y`, bit
for bit (**Eq. 4**): adding a ControlNet changes nothing until training moves it.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .zero_conv import ZeroConv2d

__all__ = ["lock", "trainable_copy", "ControlledBlock"]


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    # ldm's `disabled_train`: a parent's .train() must not flip dropout/norm layers of the
    # locked network back to training behaviour.
    return self


def lock(module: nn.Module) -> nn.Module:
    r"""Lock :math:`\Theta` (Eq. 1): freeze every parameter and keep the module in eval mode.

    ``requires_grad`` is switched off for all parameters, the module is put in eval mode, and its
    ``train()`` is disabled so that calling ``.train()`` on a parent leaves it in eval mode, as
    the released code does (``disabled_train`` in cldm/cldm.py, from ldm). Returns the module
    itself (locked in place).
    """
    module.eval()
    # A parent's .train() reaches children only through their train(), so disabling it on the
    # top module keeps the whole locked subtree in eval mode.
    module.train = functools.partial(_stay_in_eval, module)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def trainable_copy(module: nn.Module) -> nn.Module:
    r"""Clone :math:`\Theta` into a trainable copy :math:`\Theta_c` (Eq. 2): a deep copy whose
    parameters equal the original bit for bit, require gradients and share no storage with it.
    Works on a locked module too: the copy gets its ``train()`` back.
    """
    clone = copy.deepcopy(module)
    clone.__dict__.pop("train", None)  # undo lock(), if the original was locked
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone.train(module.training)


def _shape_error(name: str, expected: str, got: torch.Tensor) -> ValueError:
    return ValueError(f"{name}: expected shape {expected}, got {tuple(got.shape)}")


class ControlledBlock(nn.Module):
    r"""Eq. 2: :math:`y_c = F(x; \Theta) + Z(F(x + Z(c; \Theta_{z1}); \Theta_c); \Theta_{z2})`.

    ``block`` is :math:`F(\cdot; \Theta)`; it is locked in place (see :func:`lock`) and cloned
    into ``theta_c``. ``z1`` maps the condition's channels to the block's input channels and
    ``z2`` maps the block's output channels to themselves; both are :class:`ZeroConv2d`.

    Supported blocks: any module whose first positional input is a feature map
    (N, ``in_channels``, H, W) and whose output is a feature map (N, ``out_channels``, H', W'):
    a conv-norm-act stack, a residual block, a diffusers ``ResnetBlock2D`` (extra arguments such
    as its time embedding ``temb`` are passed unchanged to both copies), a downsampler
    (H', W' may differ from H, W). The condition ``c`` must have the same N, H, W as ``x``,
    because a 1×1 zero convolution keeps the spatial size and Eq. 2 adds it to ``x``.
    """

    def __init__(
        self,
        block: nn.Module,
        in_channels: int,
        out_channels: int | None = None,
        condition_channels: int | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.condition_channels = condition_channels or in_channels
        self.theta_c = trainable_copy(block)  # copied before locking, so it stays trainable
        self.theta = lock(block)
        self.z1 = ZeroConv2d(self.condition_channels, self.in_channels)
        self.z2 = ZeroConv2d(self.out_channels, self.out_channels)
        # The zero convolutions live where the block does, in its precision: a float64 block
        # (verifying Eq. 1–4 to the last bit) gets float64 zero convolutions.
        reference = next(block.parameters(), None)
        if reference is not None:
            self.z1.to(device=reference.device, dtype=reference.dtype)
            self.z2.to(device=reference.device, dtype=reference.dtype)

    def _check_inputs(self, x: torch.Tensor, c: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise _shape_error("x", f"(N, {self.in_channels}, H, W)", x)
        if c.dim() != 4 or c.shape[1] != self.condition_channels:
            raise _shape_error("c", f"(N, {self.condition_channels}, H, W)", c)
        if c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
            n, _, h, w = x.shape
            raise _shape_error("c", f"({n}, {self.condition_channels}, {h}, {w}) to match x", c)

    def _check_block_output(self, y: torch.Tensor, x: torch.Tensor) -> None:
        if (
            not isinstance(y, torch.Tensor)
            or y.dim() != 4
            or y.shape[:2]
            != (
                x.shape[0],
                self.out_channels,
            )
        ):
            got = y if isinstance(y, torch.Tensor) else torch.empty(0)
            raise _shape_error(
                "F(x) (the block's output)", f"({x.shape[0]}, {self.out_channels}, H', W')", got
            )

    def forward(self, x: torch.Tensor, c: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_inputs(x, c)
        y = self.theta(x, *args, **kwargs)  # F(x; Θ), Eq. 1
        self._check_block_output(y, x)
        x_c = x + self.z1(c)  # x + Z(c; Θ_z1)
        y_copy = self.theta_c(x_c, *args, **kwargs)  # F(x + Z(c; Θ_z1); Θ_c)
        if y_copy.shape != y.shape:
            raise _shape_error("F(x + Z(c); Θ_c)", str(tuple(y.shape)), y_copy)
        return y + self.z2(y_copy)  # Eq. 2
