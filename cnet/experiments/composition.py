r"""Two ControlNets at once, measured (notebook 06): the paper's composition by adding residuals.

Several ControlNets combine by adding their residuals, with no extra weighting (ICCV §3.4):
:math:`y = \mathcal F_{\text{decoder}}(\ldots, x_i + \sum_k s_k\, r^{(k)}_i, \ldots)`. Here each
scene holds two objects that can be obeyed at once and measured apart: a circle, asked for by the
Fill ControlNet's condition (its outline alone), and a square, triangle or diamond beside it,
asked for by a segmentation ControlNet's condition (its class map alone). The prompt names both
("red circle and blue square with green background"). Each object is measured on its own
region by the one fidelity definition (:func:`cnet.train.fidelity`): in its prompted colour, and
colour-blind (the layout IoU), since the base may bind a prompt's two colours to the wrong
objects. So a ControlNet is measured alone, both together, and against the other way to ask for
both objects, one segmentation ControlNet fed the class map of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ..controlnet import ControlNet
from ..injection import ControlledUNet
from ..train.evaluation import FULL_SAMPLER, fidelity, sample_set
from ..world.data import COLOUR_NAMES, DEFAULT_RESOLUTION, render_shapes
from ..world.metrics import colours_drawn

__all__ = [
    "COMPOSITIONS",
    "CompositionData",
    "composition_scenes",
    "composition_sweep",
    "measure_compositions",
]

#: What each row of :func:`composition_sweep` feeds: which ControlNets, with which conditions.
COMPOSITIONS = (
    "base alone",
    "Fill alone",
    "segmentation alone",
    "both, residuals added",
    "segmentation, both objects in one map",
)
_RADIUS = (0.14, 0.22)  # fraction of the side: two objects side by side in 64 px
_REACH = 1.6  # how far any shape reaches from its centre, in equal-area radii (triangle: 1.56)


@dataclass
class CompositionData:
    """Scenes of two objects: ``outline`` (the circle's outline alone), ``segmentation`` (the
    other shape's class map alone) and ``merged`` (both objects' class map), each (N, 3, H, W);
    ``regions`` (N, 2, H, W) and ``colours`` (N, 2) of the circle and the other shape, the
    ``background`` colour (N,) and the ``prompts``."""

    prompts: list[str]
    outline: torch.Tensor
    segmentation: torch.Tensor
    merged: torch.Tensor
    regions: torch.Tensor
    colours: torch.Tensor
    background: torch.Tensor


def _place(rng: np.random.Generator, resolution: int) -> tuple[list, str]:
    """A circle and another shape, apart: ((colour, shape, cx, cy, r) twice), the background."""
    colours = rng.choice(len(COLOUR_NAMES), size=3, replace=False)
    other = str(rng.choice(["square", "triangle", "diamond"]))
    while True:
        r = rng.uniform(*_RADIUS, size=2) * resolution
        centres = [rng.uniform(_REACH * ri + 1, resolution - _REACH * ri - 1, size=2) for ri in r]
        if np.hypot(*(centres[0] - centres[1])) > _REACH * r.sum() + 2:
            break
    shapes = [(COLOUR_NAMES[colours[k]], ("circle", other)[k], *centres[k], r[k]) for k in range(2)]
    return shapes, COLOUR_NAMES[colours[2]]


def composition_scenes(
    n: int, seed: int = 0, resolution: int = DEFAULT_RESOLUTION
) -> CompositionData:
    """``n`` two-object scenes, a pure function of ``(n, seed)``."""
    rng = np.random.default_rng([seed, 2024])
    rows = []
    for _ in range(n):
        shapes, background = _place(rng, resolution)
        both = render_shapes(shapes, background, resolution)
        rows.append(
            {
                "prompt": both["prompt"][0],
                "outline": render_shapes(shapes[:1], background, resolution)["outline"][0].float(),
                "segmentation": render_shapes(shapes[1:], background, resolution)["segmentation"][
                    0
                ].float(),
                "merged": both["segmentation"][0].float(),
                "regions": torch.stack([both["layers"][0] == k + 1 for k in range(2)]),
                "colours": torch.tensor([COLOUR_NAMES.index(s[0]) for s in shapes]),
                "background": torch.tensor(COLOUR_NAMES.index(background)),
            }
        )
    stacked = {key: torch.stack([row[key] for row in rows]) for key in rows[0] if key != "prompt"}
    return CompositionData(prompts=[row["prompt"] for row in rows], **stacked)


@torch.no_grad()
def composition_sweep(
    pipe: StableDiffusionPipeline,
    fill: ControlNet,
    segmentation: ControlNet,
    data: CompositionData,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
) -> tuple[list[dict], torch.Tensor]:
    """Each of :data:`COMPOSITIONS` on the same scenes and seeds: per object (``circle``, the
    Fill ControlNet's; ``shape``, the segmentation ControlNet's) the mean IoU of its prompted
    colour with its region and the colour-blind layout IoU (where the object is drawn, in
    whichever colour fills its region most), and the share of samples with all three prompted
    colours drawn (:func:`cnet.world.metrics.colours_drawn`); the images (rows, N, 3, H, W)."""
    unet, device = pipe.unet, pipe.unet.device
    fill, segmentation = fill.to(device).eval(), segmentation.to(device).eval()
    feeds = {
        "base alone": (None, None),
        "Fill alone": (ControlledUNet(unet, fill), data.outline),
        "segmentation alone": (ControlledUNet(unet, segmentation), data.segmentation),
        "both, residuals added": (
            ControlledUNet(unet, [fill, segmentation]),
            [data.outline, data.segmentation],
        ),
        "segmentation, both objects in one map": (ControlledUNet(unet, segmentation), data.merged),
    }
    return measure_compositions(
        pipe, {name: feeds[name] for name in COMPOSITIONS}, data, steps, guidance
    )


@torch.no_grad()
def measure_compositions(
    pipe: StableDiffusionPipeline,
    feeds: dict,
    data: CompositionData,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
) -> tuple[list[dict], torch.Tensor]:
    """Sample ``data``'s scenes with each of ``feeds`` (name → (controlled U-Net or None, its
    conditions)), the same seeds for every one, and measure each object on its own region
    (:func:`composition_sweep`'s measures); the images (rows, N, 3, H, W)."""
    rows, images = [], []
    for name, (controlled, conditions) in feeds.items():
        drawn = sample_set(pipe, controlled, data.prompts, conditions, steps, guidance)
        row = {"composition": name, "n": len(drawn)}
        for k, obj in enumerate(("circle", "shape")):
            measured = fidelity(drawn, data.colours[:, k], data.background, data.regions[:, k])
            row[f"{obj}_iou"] = float(measured["iou"].mean())
            row[f"{obj}_layout_iou"] = float(measured["layout_iou"].mean())
        names = [[COLOUR_NAMES[int(c)] for c in pair] for pair in data.colours]
        drawn_ok = colours_drawn(drawn, names, [COLOUR_NAMES[int(b)] for b in data.background])
        row["colours_ok"] = float(drawn_ok["both_ok"].float().mean())
        rows.append(row)
        images.append(drawn)
    return rows, torch.stack(images)
