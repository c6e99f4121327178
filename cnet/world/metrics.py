r"""Fidelity metrics that are exact, because the world's conditions are.

A ControlNet paper has to re-run a detector on its outputs to guess how well they follow the
condition (ControlNet++ re-segments, re-runs Canny, re-estimates depth). Here every condition is
known exactly and every colour in a prompt is a palette entry, so the check is direct:

* **colour classification**: each pixel is given the nearest palette colour (in RGB);
* **IoU** of the generated foreground (pixels of the prompted colour) with the region a
  requested outline encloses (Fill), and its colour-blind form for an empty prompt (**layout
  IoU**: the region drawn in whichever colour fills it most);
* **mIoU** over shape classes of a label map recovered from colours (segmentation);
* **edge F1** with a pixel tolerance (outline, Canny);
* **depth-order accuracy**: for each pair of overlapping shapes, is the nearer one drawn on top;
* **prompt adherence**: are the prompted colours the ones drawn;
* **shape fit**: which shape best explains a foreground mask, by IoU with a fitted template;
* **specks**: pixels of neither of an image's two colours nor any blend of them (a soft edge
  blends them; the decoder's dark speck on a circle's edge does not).

Images are (B, 3, H, W) tensors in [-1, 1]; masks are (B, H, W) bool tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import COLOUR_NAMES, SHAPES, colour_index, every_shape_mask, palette_of, shape_index

__all__ = [
    "FULL_SAMPLER",
    "SAMPLERS",
    "fidelity",
    "sampler_settings",
    "vae_round_trip",
    "classify_colours",
    "iou",
    "layout_iou",
    "mean_iou",
    "edge_f1",
    "depth_order_accuracy",
    "colours_drawn",
    "fit_shape",
    "SPECK_DISTANCE",
    "off_blend_distance",
    "worst_specks",
    "RIM_POSITIONS",
    "speck_positions",
]


def classify_colours(images: torch.Tensor, style: str = "plain") -> torch.Tensor:
    """Nearest palette colour of every pixel: (B, 3, H, W) in [-1, 1] -> (B, H, W) palette
    indices into ``COLOUR_NAMES``, in the palette of ``style`` (:data:`cnet.world.data.STYLES`)."""
    rgb = (images.float().clamp(-1, 1) + 1) / 2
    palette = torch.from_numpy(palette_of(style)).to(rgb)  # (colours, 3)
    distances = ((rgb[:, None] - palette[None, :, :, None, None]) ** 2).sum(dim=2)
    return distances.argmin(dim=1)


def iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Intersection over union per image, :math:`|P \cap T| / |P \cup T|` of (B, H, W) masks;
    1.0 where both are empty."""
    predicted, target = predicted.bool().flatten(1), target.bool().flatten(1)
    intersection = (predicted & target).sum(1).float()
    union = (predicted | target).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def layout_iou(images: torch.Tensor, region: torch.Tensor, style: str = "plain") -> torch.Tensor:
    r"""IoU with the requested ``region`` (B, H, W) when no colour is asked for (an empty prompt):
    :math:`|F \cap R| / |F \cup R|` with :math:`F` every pixel of the palette colour drawn most
    often inside :math:`R`, whatever that colour is. With a prompt, :math:`F` would be the
    prompted colour's pixels (the IoU of :func:`fidelity`). An image of one
    colour scores :math:`|R| / HW` here, whichever colour it is."""
    drawn = classify_colours(images, style)
    counts = torch.stack(
        [
            torch.bincount(d[r], minlength=len(COLOUR_NAMES))
            for d, r in zip(drawn, region.bool(), strict=True)
        ]
    )
    return iou(drawn == counts.argmax(1)[:, None, None], region)


def mean_iou(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """Per-class IoU over a whole set of label maps (intersections and unions summed over all
    images, as ADE20K's benchmark does) and their mean over the classes that occur in either.
    Returns ``{"miou": float, "per_class": [float or None, ...]}``."""
    per_class: list[float | None] = []
    for c in range(num_classes):
        p, t = predicted == c, target == c
        union = (p | t).sum().item()
        per_class.append((p & t).sum().item() / union if union else None)
    present = [v for v in per_class if v is not None]
    return {"miou": float(np.mean(present)) if present else 1.0, "per_class": per_class}


def edge_f1(predicted: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """F1 of predicted edge pixels against target edge pixels, per image, where a pixel counts as
    matched if the other map has an edge within ``tolerance`` pixels (Chebyshev distance).
    Precision = matched predicted / predicted, recall = matched target / target; 1.0 where both
    maps are empty, 0.0 where only one is."""
    predicted, target = predicted.bool(), target.bool()

    def near(mask: torch.Tensor) -> torch.Tensor:
        size = 2 * tolerance + 1
        return F.max_pool2d(mask[:, None].float(), size, stride=1, padding=tolerance)[:, 0] > 0

    n_pred = predicted.flatten(1).sum(1).float()
    n_true = target.flatten(1).sum(1).float()
    precision = (predicted & near(target)).flatten(1).sum(1) / n_pred.clamp(min=1)
    recall = (target & near(predicted)).flatten(1).sum(1) / n_true.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (n_pred == 0) & (n_true == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)


def depth_order_accuracy(
    images: torch.Tensor, shape_masks_: torch.Tensor, colours: Sequence[Sequence[str]]
) -> dict:
    """For every pair of shapes whose full masks overlap where no third, nearer shape hides
    them, is the nearer shape of the pair the one drawn on top? ``shape_masks_``
    (B, slots, H, W) holds each shape's full (unoccluded) mask, back to front as the dataset
    gives them; ``colours[b]`` names the colour of each present slot. The overlap's majority
    palette colour decides which shape is on top. Returns ``{"accuracy": correct / pairs,
    "pairs": pairs}`` (accuracy None when no pair overlaps)."""
    drawn = classify_colours(images)
    correct = pairs = 0
    for b, names in enumerate(colours):
        ids = [colour_index(n) for n in names]
        for back in range(len(ids)):
            for front in range(back + 1, len(ids)):
                overlap = shape_masks_[b, back] & shape_masks_[b, front]
                for nearer in range(front + 1, len(ids)):  # hidden by a third shape: no vote
                    overlap &= ~shape_masks_[b, nearer]
                if not overlap.any():
                    continue
                pairs += 1
                votes = drawn[b][overlap]
                correct += int((votes == ids[front]).sum() > (votes == ids[back]).sum())
    return {"accuracy": correct / pairs if pairs else None, "pairs": pairs}


def colours_drawn(
    images: torch.Tensor,
    foregrounds: Sequence[Sequence[str]],
    backgrounds: Sequence[str],
    min_fraction: float = 0.01,
    style: str = "plain",
) -> dict:
    """Prompt adherence for colours. The background is right when the prompted background colour
    is the majority colour of the image's border ring; the foreground is right when every
    prompted foreground colour covers at least ``min_fraction`` of the image and together they
    are the majority of the pixels not of the background colour (so a circle of the wrong colour
    with a few pixels of the right one does not pass). Returns per-image bool tensors
    ``background_ok``, ``foreground_ok``, ``both_ok``. Colours are named in ``style``'s palette."""
    drawn = classify_colours(images, style)
    border = torch.cat([drawn[:, 0], drawn[:, -1], drawn[:, 1:-1, 0], drawn[:, 1:-1, -1]], 1)
    background_ok, foreground_ok = [], []
    pixels = drawn[0].numel()
    for b, (fg_names, bg_name) in enumerate(zip(foregrounds, backgrounds, strict=True)):
        counts = torch.bincount(border[b], minlength=len(COLOUR_NAMES))
        background_ok.append(int(counts.argmax()) == colour_index(bg_name))
        wanted = [colour_index(n) for n in fg_names]
        covers = [(drawn[b] == c).sum().item() for c in wanted]
        not_background = (drawn[b] != colour_index(bg_name)).sum().item()
        foreground_ok.append(
            min(covers) >= min_fraction * pixels and sum(covers) > not_background / 2
        )
    background = torch.tensor(background_ok)
    foreground = torch.tensor(foreground_ok)
    return {
        "background_ok": background,
        "foreground_ok": foreground,
        "both_ok": background & foreground,
    }


def fit_shape(masks: torch.Tensor, shapes: Sequence[str] = SHAPES) -> dict:
    """Which shape explains each mask (B, H, W) best. Each candidate is placed at the mask's
    centroid with the mask's area (the equal-area radius r = sqrt(area / pi)), then nudged by
    up to 1 px and scaled by 0.85 to 1.15; the best IoU over those placements is the candidate's
    fit. Returns ``{"shape": [name or None per image], "iou": (B, candidates) tensor}``; an
    empty mask gets shape None and fits 0."""
    masks = masks.bool()
    batch, height, _ = masks.shape
    indices = [shape_index(s) for s in shapes]
    fits = torch.zeros(batch, len(indices))
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(height) + 0.5, indexing="ij")
    offsets = [
        (dx, dy, k)
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for k in (0.85, 0.925, 1.0, 1.075, 1.15)
    ]
    for b in range(batch):
        area = masks[b].sum().item()
        if area == 0:
            continue
        cx = (xs * masks[b]).sum().item() / area
        cy = (ys * masks[b]).sum().item() / area
        r = np.sqrt(area / np.pi)
        templates = torch.from_numpy(
            every_shape_mask(  # (shapes, placements, H, W)
                np.array([cx + o[0] for o in offsets]),
                np.array([cy + o[1] for o in offsets]),
                np.array([r * o[2] for o in offsets]),
                height,
            )[indices]
        )
        placed = templates.flatten(0, 1)
        fits[b] = iou(placed, masks[b].expand(len(placed), -1, -1)).view(len(indices), -1).amax(1)
    names = [shapes[int(fits[b].argmax())] if masks[b].any() else None for b in range(batch)]
    return {"shape": names, "iou": fits}


# ------------------------------------------------------------------------------------------
# Condition fidelity (the one definition; cnet.train.evaluation's module docstring explains it)
# ------------------------------------------------------------------------------------------

#: How fidelity is sampled, by profile: DDIM with ``steps`` steps and classifier-free guidance
#: ``guidance`` (the training profiles' ``eval_steps`` and ``guidance_scale`` are these).
SAMPLERS: dict[str, dict] = {
    "quick": {"steps": 10, "guidance": 3.0},
    "full": {"steps": 20, "guidance": 3.0},
}
#: The full profile's sampler: the default wherever fidelity is measured.
FULL_SAMPLER = dict(SAMPLERS["full"])


def sampler_settings(profile: str) -> dict:
    """``{"steps": …, "guidance": …}``: how a profile samples when it measures fidelity."""
    return dict(SAMPLERS[profile])


def fidelity(
    images: torch.Tensor,
    foreground: torch.Tensor,
    background: torch.Tensor,
    region: torch.Tensor,
    style: str = "plain",
) -> dict[str, torch.Tensor]:
    """Per-image fidelity of ``images`` (N, 3, H, W) in [-1, 1] to a requested region
    (N, H, W) bool, with prompted ``foreground`` and ``background`` palette indices (N,):
    ``{"iou": (N,) float, "colours_ok": (N,) bool, "layout_iou": (N,) float}``."""
    drawn = classify_colours(images, style)
    ious = iou(drawn == foreground[:, None, None], region)
    colours = colours_drawn(
        images,
        [[COLOUR_NAMES[int(i)]] for i in foreground],
        [COLOUR_NAMES[int(i)] for i in background],
        style=style,
    )
    return {
        "iou": ious,
        "colours_ok": colours["both_ok"],
        "layout_iou": layout_iou(images, region, style),
    }


@torch.no_grad()
def vae_round_trip(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images encoded to the latent mode by ``pipe``'s VAE and decoded again: what the VAE
    alone keeps of them."""
    latents = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode()
    return pipe.vae.decode(latents).sample.float().cpu()


#: A pixel at least this far (RGB distance, channels in [0, 1]) from every blend of its image's
#: two colours is a speck: a tenth of the palette's smallest gap would be invisible, this is not.
SPECK_DISTANCE = 0.25


def off_blend_distance(
    images: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, style: str = "plain"
) -> torch.Tensor:
    r"""Each pixel's RGB distance (channels in [0, 1]) to the nearest blend
    :math:`(1-t)\,c_f + t\,c_b,\ t \in [0, 1]` of its image's palette colours ``foreground``
    and ``background`` (indices (N,)): 0 on either colour and on any soft edge between them.
    Images (N, 3, H, W) in [-1, 1]; returns (N, H, W)."""
    rgb = (images.float().clamp(-1, 1) + 1) / 2
    palette = torch.from_numpy(palette_of(style)).to(rgb)
    fg = palette[foreground.long()][:, :, None, None]
    gap = palette[background.long()][:, :, None, None] - fg
    t = ((rgb - fg) * gap).sum(1, keepdim=True) / (gap * gap).sum(1, keepdim=True).clamp_min(1e-12)
    return (rgb - (fg + t.clamp(0, 1) * gap)).norm(dim=1)


def worst_specks(
    images: torch.Tensor,
    foreground: torch.Tensor,
    background: torch.Tensor,
    region: torch.Tensor,
    width: int = 2,
    style: str = "plain",
) -> dict[str, torch.Tensor]:
    """Per image, the largest :func:`off_blend_distance` within ``width`` pixels of the
    boundary of ``region`` (N, H, W) bool (``"edge"``), and elsewhere (``"away"``); an image
    has a speck there where that is at least :data:`SPECK_DISTANCE`."""
    at_edge, away = _split_at_edge(
        off_blend_distance(images, foreground, background, style), region, width
    )
    return {"edge": at_edge.flatten(1).amax(1), "away": away.flatten(1).amax(1)}


def _split_at_edge(
    distance: torch.Tensor, region: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``distance`` (N, H, W) within ``width`` pixels of the boundary of ``region`` (either
    side), and elsewhere; each zero outside its part."""
    inside = region.float()[:, None]
    size = 2 * width + 1
    grown = F.max_pool2d(inside, size, 1, width)
    shrunk = -F.max_pool2d(-inside, size, 1, width)
    near = (grown != shrunk)[:, 0]
    zero = torch.zeros_like(distance)
    return torch.where(near, distance, zero), torch.where(near, zero, distance)


#: The eight positions on a rim, as on a clock face seen from the circle's centre.
RIM_POSITIONS = ("12:00", "1:30", "3:00", "4:30", "6:00", "7:30", "9:00", "10:30")


def speck_positions(
    images: torch.Tensor,
    foreground: torch.Tensor,
    background: torch.Tensor,
    region: torch.Tensor,
    width: int = 2,
    style: str = "plain",
) -> list[str | None]:
    """Per image, where on the rim of ``region`` its speck at the edge sits: the nearest of
    :data:`RIM_POSITIONS` to the direction from the region's centroid to the worst pixel of
    :func:`worst_specks`' ``"edge"`` (12:00 is up, the first row; 3:00 is right), or ``None``
    where that pixel is no speck."""
    distance, _ = _split_at_edge(
        off_blend_distance(images, foreground, background, style), region, width
    )
    rows, cols = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in region.shape[1:]), indexing="ij"
    )
    positions: list[str | None] = []
    for at_edge, inside in zip(distance, region.double()):
        if at_edge.max() < SPECK_DISTANCE:
            positions.append(None)
            continue
        pixel = at_edge.flatten().argmax()
        up = (inside * rows).sum() / inside.sum() - rows.flatten()[pixel]
        right = cols.flatten()[pixel] - (inside * cols).sum() / inside.sum()
        clockwise_from_up = torch.atan2(right, up).rad2deg().item() % 360  # 0 up, 90 right
        positions.append(RIM_POSITIONS[round(clockwise_from_up / 45) % 8])
    return positions
