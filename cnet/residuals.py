r"""The ControlNet's outputs and their scales (ICCV §3.2).

A ControlNet for SD returns 12 + 1 *residuals* :math:`r_0 \dots r_{11}, r_{12}`, one per skip
connection of the locked U-Net and one for its middle block (:class:`ControlResiduals`). Before
they are added, each is multiplied by a control scale :math:`s_i` (:func:`control_scales`):
1 by default, or guess mode's ramp (:func:`guess_mode_scales`), shallow residuals weakest: the
released demos' ramp, diffusers' ramp, or the paper's CFG resolution weighting
(:func:`cfg_resolution_weights`, ICCV §3.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "GUESS_MODE_BASE",
    "ControlResiduals",
    "GuessRule",
    "cfg_resolution_weights",
    "control_scales",
    "guess_mode_scales",
]

GuessRule = Literal["released", "diffusers", "cfg_rw"]

#: The released demos' guess-mode base: scale_i = 0.825 ** (12 - i) (gradio_*.py, "Magic number").
GUESS_MODE_BASE = 0.825


@dataclass(frozen=True)
class ControlResiduals:
    r"""The ControlNet's 12 + 1 outputs: ``down`` (one per skip connection, encoder order) and
    ``mid`` (for the middle block's output). ``tensors()`` lists all 13 in order, mid last."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def __len__(self) -> int:
        return len(self.down) + 1

    def tensors(self) -> list[torch.Tensor]:
        return [*self.down, self.mid]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> ControlResiduals:
        return cls(down=tuple(tensors[:-1]), mid=tensors[-1])

    def scaled(self, scales: Sequence[float]) -> ControlResiduals:
        r""":math:`s_i r_i` for each residual; ``scales`` has one entry per residual."""
        if len(scales) != len(self):
            raise ValueError(f"expected {len(self)} scales (one per residual), got {len(scales)}")
        return ControlResiduals.from_tensors([r * s for r, s in zip(self.tensors(), scales)])

    def pooled(self) -> ControlResiduals:
        """Global average pooling of each residual over H, W (ControlNet 1.1 "shuffle"): the
        residual then carries no layout, only a per-channel shift, broadcast over the skip."""
        return ControlResiduals.from_tensors(
            [r.mean(dim=(2, 3), keepdim=True) for r in self.tensors()]
        )

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        """Composition of several ControlNets: their residuals add, with no extra weighting."""
        if len(other) != len(self):
            raise ValueError(f"cannot add {len(other)} residuals to {len(self)}")
        return ControlResiduals.from_tensors(
            [a + b for a, b in zip(self.tensors(), other.tensors())]
        )

    def scattered(self, mask: torch.Tensor) -> ControlResiduals:
        """Residuals computed for the samples where ``mask`` is True, zeros elsewhere (e.g. no
        control on the unconditional half of a classifier-free-guidance batch)."""

        def scatter(r: torch.Tensor) -> torch.Tensor:
            full = r.new_zeros((mask.shape[0], *r.shape[1:]))
            full[mask] = r
            return full

        return ControlResiduals.from_tensors([scatter(r) for r in self.tensors()])


def cfg_resolution_weights(heights: Sequence[int]) -> tuple[float, ...]:
    r"""Classifier-free guidance resolution weighting (CFG-RW, ICCV §3.4): with the condition
    added to the conditional branch only, residual :math:`i` of height :math:`h_i` is multiplied
    by :math:`w_i = 64 / h_i`. 64 is SD1.5's latent size, the height of its first residual, so
    for a U-Net of any latent size :math:`w_i = h_0 / h_i`: 1 at full latent resolution, 8 at
    1/8 of it (SD1.5: 1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8)."""
    if not heights or any(h < 1 for h in heights):
        raise ValueError(f"heights: expected residual heights >= 1, got {list(heights)}")
    return tuple(heights[0] / h for h in heights)


def guess_mode_scales(
    n_residuals: int = 13, rule: GuessRule = "released", heights: Sequence[int] | None = None
) -> tuple[float, ...]:
    r"""Guess mode's per-residual scales, shallow residuals weakest (the middle one 1 in the
    released and diffusers ramps).

    * ``rule="released"`` (the released demos, gradio_*.py):
      :math:`s_i = 0.825^{\,n-1-i}`, i.e. :math:`0.825^{12-i}` for SD's 13 residuals.
    * ``rule="diffusers"`` (``ControlNetModel.forward``): ``torch.logspace(-1, 0, n)``, i.e.
      :math:`s_i = 10^{-(n-1-i)/(n-1)} = (10^{-1/12})^{12-i}` for n = 13.

    The two are the same geometric ramp with slightly different ratios:
    :math:`10^{-1/12} = 0.82540\ldots` against 0.825, so diffusers' first scale is exactly 0.1
    where the released one is :math:`0.825^{12} = 0.0994`; they differ by at most 0.6 %.
    * ``rule="cfg_rw"``: the paper's :func:`cfg_resolution_weights`, from the residuals'
      ``heights``.
    """
    if n_residuals < 1:
        raise ValueError(f"expected n_residuals >= 1, got {n_residuals}")
    if rule == "released":
        return tuple(GUESS_MODE_BASE ** float(n_residuals - 1 - i) for i in range(n_residuals))
    if rule == "diffusers":
        return tuple(torch.logspace(-1, 0, n_residuals).tolist())
    if rule == "cfg_rw":
        if heights is None or len(heights) != n_residuals:
            raise ValueError(f"guess_rule 'cfg_rw' needs the {n_residuals} residuals' heights")
        return cfg_resolution_weights(heights)
    raise ValueError(f"guess_rule: expected 'released', 'diffusers' or 'cfg_rw', got {rule!r}")


def control_scales(
    n_residuals: int,
    scale: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
    guess_rule: GuessRule = "released",
    heights: Sequence[int] | None = None,
) -> tuple[float, ...]:
    """The scales :math:`s_i` for ``n_residuals`` residuals: ``scale`` (one number, or one per
    residual), times :func:`guess_mode_scales` when ``guess_mode`` is on (``heights``: the
    residuals' heights, for the ``cfg_rw`` rule)."""
    if isinstance(scale, (int, float)):
        scales = (float(scale),) * n_residuals
    else:
        scales = tuple(float(s) for s in scale)
        if len(scales) != n_residuals:
            raise ValueError(
                f"expected one control scale or {n_residuals} (one per residual: "
                f"{n_residuals - 1} skip connections + 1 middle block), got {len(scales)}"
            )
    if guess_mode:
        ramp = guess_mode_scales(n_residuals, guess_rule, heights)
        if guess_rule == "diffusers":  # float32 products, as diffusers computes them
            return tuple((torch.tensor(ramp) * torch.tensor(scales)).tolist())
        scales = tuple(s * g for s, g in zip(scales, ramp))
    return scales
