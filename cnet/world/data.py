r"""Procedural images whose conditions are known exactly.

Two families of scenes, both rendered with hard edges (no anti-aliasing) so that every condition
is an exact function of the scene, not an estimate:

* **Fill**, the released tutorial's Fill50K task in miniature: a circle filled with a named
  colour on a background of another named colour. Condition: the circle's outline on black.
  Prompt: ``"<colour> circle with <colour> background"``.
* **Shapes**: one to three shapes (circle, square, triangle, diamond), each with its own colour,
  size and position, drawn back to front. Conditions derived from the same scene: outline, Canny
  edges of the rendered image (OpenCV's ``cv2.Canny``, as the released ControlNet annotator
  runs it on photos), segmentation (one colour per shape class), depth (nearness of the front-most
  shape, 0 for the background) and scribble (the outline, jittered and broken).

Conventions, as Stable Diffusion and diffusers use them: tensors are NCHW, images lie in
:math:`[-1, 1]`, conditions in :math:`[0, 1]` with 3 channels. Every sample is a pure function of
``(seed, split, index)``: the same index gives the same bytes, on any machine, in any order.

Resolution: 64 px by default. With the miniature VAE's 8x downsampling (Stable Diffusion's
factor) the U-Net works on 8x8 latents, small enough to pretrain the base and train ControlNets
on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .palette import COLOUR_NAMES, PALETTE, PALETTE_RGB, STYLES, colour_index, palette_of

#: The conditions the world renders exactly, each a task a ControlNet can be trained on:
#: Fill (an outline, the filled circle) and the Shapes scene's conditions.
TASKS = ("fill", "outline", "canny", "segmentation", "depth", "scribble")

__all__ = [
    "TASKS",
    "PALETTE",
    "STYLES",
    "SHAPES",
    "SEGMENTATION_COLOURS",
    "CONDITIONS",
    "DEFAULT_RESOLUTION",
    "colour_index",
    "palette_of",
    "shape_index",
    "check_resolution",
    "shape_masks",
    "every_shape_mask",
    "outline_of",
    "region_inside",
    "canny_edges",
    "render_fill",
    "render_shapes",
    "FillDataset",
    "ShapesDataset",
]

DEFAULT_RESOLUTION = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Segmentation label 0 is the background, label k + 1 is SHAPES[k] (ADE20K-style class colours).
SEGMENTATION_COLOURS = (
    np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25]], dtype=np.float32
    )
    / 255.0
)
CONDITIONS: tuple[str, ...] = ("outline", "canny", "segmentation", "depth", "scribble")

# Size parameter r is the radius of the circle of equal area: every shape of size r covers
# pi r^2 pixels, so a shape's size never tells it apart from another shape.
_SQUARE_HALF_SIDE = np.sqrt(np.pi) / 2  # (2h)^2 = pi r^2
_TRIANGLE_CIRCUMRADIUS = np.sqrt(4 * np.pi / (3 * np.sqrt(3)))  # (3 sqrt3 / 4) R^2 = pi r^2
_DIAMOND_HALF_DIAGONAL = np.sqrt(np.pi / 2)  # 2 d^2 = pi r^2
# How far each shape reaches from its centre, in units of r (keeps shapes inside the image).
_EXTENT = np.array(
    [1.0, _SQUARE_HALF_SIDE * np.sqrt(2), _TRIANGLE_CIRCUMRADIUS, _DIAMOND_HALF_DIAGONAL]
)

FILL_RADIUS = (0.12, 0.38)  # fraction of the resolution: radii vary widely, as in Fill50K
# Shapes are 16-30% of the image side in equal-area radius (10-19 px at 64 px): big enough that
# an 8x8 latent (8 px per latent pixel) keeps their corners.
SHAPES_RADIUS = (0.16, 0.30)
MAX_SHAPES = 3
_SPLITS = {"train": 0, "eval": 1}
# Canny thresholds of the released ControlNet demo (gradio_canny2image.py defaults).
CANNY_LOW, CANNY_HIGH = 100, 200


def shape_index(name: str) -> int:
    """Index of a named shape in :data:`SHAPES`; ValueError naming the shapes otherwise."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
    return SHAPES.index(name)


def check_resolution(resolution: int, factor: int = 4) -> int:
    """Return ``resolution`` if it is a positive multiple of ``factor`` (the VAE's downsampling)
    and at least 16 px; raise ValueError otherwise."""
    if not isinstance(resolution, (int, np.integer)) or resolution < 16 or resolution % factor:
        raise ValueError(
            f"resolution must be an integer >= 16 divisible by {factor} (the VAE's downsampling "
            f"factor), got {resolution!r}"
        )
    return int(resolution)


# ---------------------------------------------------------------------------------- geometry


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x to the right, y downwards), each of shape (1, H, W)."""
    centres = np.arange(resolution, dtype=np.float32) + 0.5
    return centres[None, None, :], centres[None, :, None]


def shape_masks(
    shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, resolution: int
) -> np.ndarray:
    """Boolean masks (B, H, W) of a batch of shapes given by shape index, centre and size r
    (the radius of the equal-area circle), all arrays of shape (B,). Vectorised over the batch."""
    stacked = every_shape_mask(cx, cy, r, resolution)  # (shapes, B, H, W)
    return np.take_along_axis(stacked, np.asarray(shape)[None, :, None, None], axis=0)[0]


def every_shape_mask(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, resolution: int) -> np.ndarray:
    """Boolean masks (shapes, B, H, W): each of :data:`SHAPES` at each centre and size."""
    x, y = _grid(resolution)
    dx = x - np.asarray(cx, np.float32)[:, None, None]
    dy = y - np.asarray(cy, np.float32)[:, None, None]
    r = np.asarray(r, np.float32)[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = np.maximum(np.abs(dx), np.abs(dy)) <= _SQUARE_HALF_SIDE * r
    # Equilateral triangle pointing up: inside all three edges, whose outward normals point
    # down, up-left and up-right, at the inradius R/2 from the centre.
    half_inradius = _TRIANGLE_CIRCUMRADIUS * r / 2
    s, c = np.float32(0.5), np.float32(np.sqrt(3) / 2)
    triangle = (
        (dy <= half_inradius)
        & (-c * dx - s * dy <= half_inradius)
        & (c * dx - s * dy <= half_inradius)
    )
    diamond = np.abs(dx) + np.abs(dy) <= _DIAMOND_HALF_DIAGONAL * r
    return np.stack([circle, square, triangle, diamond])


def outline_of(layers: np.ndarray) -> np.ndarray:
    """Outline of a layer map (B, H, W) of ints, 0 = background, larger = nearer: the pixels
    whose layer is in front of one of their 4-neighbours. For a single shape this is its inner
    boundary (the mask pixels touching the outside); where two shapes overlap, the line lies on
    the front shape. The image border does not count as an edge."""
    padded = np.pad(layers, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = padded[:, 1:-1, 1:-1]
    neighbours = [
        padded[:, :-2, 1:-1],
        padded[:, 2:, 1:-1],
        padded[:, 1:-1, :-2],
        padded[:, 1:-1, 2:],
    ]
    return np.any([centre > n for n in neighbours], axis=0)


def region_inside(outline: np.ndarray) -> np.ndarray:
    """The region a closed outline (H, W) bounds, outline included: everything that a
    4-connected flood fill from outside the image cannot reach without crossing the outline.
    Inverse of :func:`outline_of` for one shape: ``region_inside(outline_of(m)) == m``."""
    outline = np.asarray(outline, bool)
    height, width = outline.shape
    canvas = np.pad(outline.astype(np.uint8), 1)  # a free ring around the image to start from
    flood_mask = np.zeros((height + 4, width + 4), np.uint8)
    cv2.floodFill(canvas, flood_mask, (0, 0), 2, flags=4)
    return canvas[1:-1, 1:-1] != 2


def canny_edges(images: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Canny edges (B, H, W) bool of RGB images (B, H, W, 3) uint8, with OpenCV's ``cv2.Canny``
    on the grey image, as the released ControlNet's Canny annotator runs it on photos."""
    grey = [cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY) for im in images]
    return np.stack([cv2.Canny(g, low, high) > 0 for g in grey])


# ---------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneBatch:
    """Parameters of a batch of scenes, one row per scene, up to MAX_SHAPES slots back to front.

    ``shape``, ``colour``, ``cx``, ``cy``, ``r``, ``nearness`` and ``present`` have shape
    (B, slots); ``background`` has shape (B,). Unused slots have ``present`` False.
    """

    shape: np.ndarray
    colour: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    r: np.ndarray
    nearness: np.ndarray
    present: np.ndarray
    background: np.ndarray

    def prompts(self) -> list[str]:
        """The text of each scene: its shapes back to front as ``"<colour> <shape>"`` joined by
        "and", then ``"with <colour> background"``; for Fill that is the tutorial's
        ``"<colour> circle with <colour> background"``."""
        prompts = []
        for b in range(len(self.background)):
            parts = [
                f"{COLOUR_NAMES[self.colour[b, k]]} {SHAPES[self.shape[b, k]]}"
                for k in range(self.shape.shape[1])
                if self.present[b, k]
            ]
            prompts.append(
                f"{' and '.join(parts)} with {COLOUR_NAMES[self.background[b]]} background"
            )
        return prompts


def _render(
    scenes: SceneBatch,
    resolution: int,
    conditions: Sequence[str],
    scribble_rngs: Sequence[np.random.Generator] = (),
    palette: np.ndarray = PALETTE_RGB,
) -> dict:
    """Rasterise a batch of scenes into images (painted with ``palette``), layer maps, full shape
    masks and the requested conditions (numpy arrays; the scribble draws its randomness from
    ``scribble_rngs``)."""
    batch, slots = scenes.shape.shape
    image = np.broadcast_to(
        palette[scenes.background][:, :, None, None], (batch, 3, resolution, resolution)
    ).copy()
    layers = np.zeros((batch, resolution, resolution), np.int64)  # slot + 1 of the front shape
    full_masks = np.zeros((batch, slots, resolution, resolution), bool)
    for k in range(slots):  # back to front: later slots occlude earlier ones
        mask = shape_masks(
            scenes.shape[:, k], scenes.cx[:, k], scenes.cy[:, k], scenes.r[:, k], resolution
        )
        mask &= scenes.present[:, k, None, None]
        full_masks[:, k] = mask
        image = np.where(mask[:, None], palette[scenes.colour[:, k]][:, :, None, None], image)
        layers[mask] = k + 1
    out = {"image": image * 2 - 1, "layers": layers, "shape_masks": full_masks}
    front_slot = np.clip(layers - 1, 0, None)
    if "outline" in conditions or "scribble" in conditions:
        outline = outline_of(layers)
        out["outline"] = outline
    if "canny" in conditions:
        rgb8 = np.round(image.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        out["canny"] = canny_edges(rgb8)
    if "segmentation" in conditions:
        front_class = np.take_along_axis(scenes.shape, front_slot.reshape(batch, -1), 1)
        labels = np.where(layers > 0, front_class.reshape(layers.shape) + 1, 0)
        out["labels"] = labels
        out["segmentation"] = SEGMENTATION_COLOURS[labels].transpose(0, 3, 1, 2)
    if "depth" in conditions:
        nearness = np.take_along_axis(scenes.nearness, front_slot.reshape(batch, -1), 1)
        out["depth"] = np.where(layers > 0, nearness.reshape(layers.shape), 0.0)
    if "scribble" in conditions:
        out["scribble"] = _scribble(outline, scribble_rngs)
    for name in ("outline", "canny", "depth"):
        if name in out:
            out[name] = np.repeat(out[name][:, None].astype(np.float32), 3, axis=1)
    if "scribble" in out:
        out["scribble"] = np.repeat(out["scribble"][:, None].astype(np.float32), 3, axis=1)
    return out


def _scribble(outline: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """A hand-drawn-looking outline: every outline pixel moved by a smooth random displacement
    (up to about 1.5 px) and the line broken in random 4 x 4 px cells (a quarter of them)."""
    batch, height, width = outline.shape
    result = np.zeros_like(outline)
    for b in range(batch):
        coarse = rngs[b].uniform(-1.5, 1.5, size=(2, 4, 4)).astype(np.float32)
        keep = rngs[b].uniform(size=(height // 4, width // 4)) >= 0.25
        field = [cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in coarse]
        ys, xs = np.nonzero(outline[b])
        keep_pixel = (
            cv2.resize(keep.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)[
                ys, xs
            ]
            > 0
        )
        ys2 = np.clip(np.round(ys + field[1][ys, xs]), 0, height - 1).astype(int)
        xs2 = np.clip(np.round(xs + field[0][ys, xs]), 0, width - 1).astype(int)
        result[b, ys2[keep_pixel], xs2[keep_pixel]] = True
    return result


def _pick_distinct(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.choice(len(COLOUR_NAMES), size=count, replace=False)


def _sample_fill(rng: np.random.Generator, resolution: int) -> dict:
    colours = _pick_distinct(rng, 2)
    r = rng.uniform(*FILL_RADIUS) * resolution
    cx, cy = rng.uniform(r + 1, resolution - r - 1, size=2)
    return dict(
        shape=[0],
        colour=[colours[0]],
        cx=[cx],
        cy=[cy],
        r=[r],
        nearness=[1.0],
        present=[True],
        background=colours[1],
    )


def _sample_shapes(rng: np.random.Generator, resolution: int) -> dict:
    count = int(rng.integers(1, MAX_SHAPES + 1))
    colours = _pick_distinct(rng, count + 1)
    shape = rng.integers(0, len(SHAPES), size=MAX_SHAPES)
    r = rng.uniform(*SHAPES_RADIUS, size=MAX_SHAPES) * resolution
    reach = _EXTENT[shape] * r + 1
    cx = rng.uniform(reach, resolution - reach)
    cy = rng.uniform(reach, resolution - reach)
    nearness = np.sort(rng.uniform(0.3, 1.0, size=MAX_SHAPES))  # drawn back to front
    present = np.arange(MAX_SHAPES) < count
    colour = np.zeros(MAX_SHAPES, np.int64)
    colour[:count] = colours[1:]
    return dict(
        shape=shape,
        colour=colour,
        cx=cx,
        cy=cy,
        r=r,
        nearness=nearness,
        present=present,
        background=colours[0],
    )


def _stack(rows: list[dict]) -> SceneBatch:
    def col(key, dtype):
        return np.array([row[key] for row in rows], dtype=dtype)

    return SceneBatch(
        shape=col("shape", np.int64),
        colour=col("colour", np.int64),
        cx=col("cx", np.float32),
        cy=col("cy", np.float32),
        r=col("r", np.float32),
        nearness=col("nearness", np.float32),
        present=col("present", bool),
        background=col("background", np.int64),
    )


# ---------------------------------------------------------------------------------- public


def _to_sample(out: dict, prompts: list[str]) -> dict:
    sample = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in out.items()}
    sample["image"] = sample["image"].float()
    sample["prompt"] = prompts
    return sample


def render_fill(
    colour: str,
    background: str,
    cx: float,
    cy: float,
    radius: float,
    resolution: int = DEFAULT_RESOLUTION,
) -> dict:
    """One Fill scene from names: ``image`` (1, 3, H, W) in [-1, 1], ``outline`` (1, 3, H, W) in
    [0, 1], ``layers`` and ``prompt``. ValueError for an unknown colour or a bad resolution."""
    check_resolution(resolution)
    row = dict(
        shape=[0],
        colour=[colour_index(colour)],
        cx=[cx],
        cy=[cy],
        r=[radius],
        nearness=[1.0],
        present=[True],
        background=colour_index(background),
    )
    scenes = _stack([row])
    return _to_sample(_render(scenes, resolution, ("outline",)), scenes.prompts())


def render_shapes(
    shapes: Sequence[tuple[str, str, float, float, float]],
    background: str,
    resolution: int = DEFAULT_RESOLUTION,
    seed: int = 0,
) -> dict:
    """One Shapes scene from names: ``shapes`` lists ``(colour, shape, cx, cy, r)`` back to front
    (1 to MAX_SHAPES of them). Returns the image and every condition as (1, 3, H, W) tensors.
    ValueError for unknown colour or shape names, too many shapes or a bad resolution."""
    check_resolution(resolution)
    if not 1 <= len(shapes) <= MAX_SHAPES:
        raise ValueError(f"expected 1 to {MAX_SHAPES} shapes, got {len(shapes)}")
    pad = MAX_SHAPES - len(shapes)
    row = dict(
        shape=[shape_index(s[1]) for s in shapes] + [0] * pad,
        colour=[colour_index(s[0]) for s in shapes] + [0] * pad,
        cx=[s[2] for s in shapes] + [0.0] * pad,
        cy=[s[3] for s in shapes] + [0.0] * pad,
        r=[s[4] for s in shapes] + [0.0] * pad,
        nearness=list(np.linspace(0.3, 1.0, MAX_SHAPES)),
        present=[True] * len(shapes) + [False] * pad,
        background=colour_index(background),
    )
    scenes = _stack([row])
    out = _render(scenes, resolution, CONDITIONS, [np.random.default_rng(seed)])
    return _to_sample(out, scenes.prompts())


class _ProceduralDataset(Dataset):
    """A fixed-size, indexable view of an infinite procedural stream: sample ``i`` of a split is
    a pure function of ``(seed, split, i)``, so it is reproducible in any order, and ``batch``
    renders many indices at once (vectorised), for training loops that skip the DataLoader.
    ``style`` (:data:`STYLES`) picks the palette only: the scenes, prompts and conditions of
    index ``i`` are the same in every style (but Canny edges, found in the painted image)."""

    family = ""
    conditions: tuple[str, ...] = ()

    def __init__(
        self,
        size: int = 50_000,
        split: str = "train",
        resolution: int = DEFAULT_RESOLUTION,
        seed: int = 0,
        style: str = "plain",
    ):
        self.palette = palette_of(style)
        self.style = style
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size, self.split, self.seed = int(size), split, int(seed)
        self.resolution = check_resolution(resolution)

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        family_id = 0 if self.family == "fill" else 1
        return np.random.default_rng([self.seed, family_id, _SPLITS[self.split], index, stream])

    def _sample_params(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def scenes(self, indices: Sequence[int]) -> SceneBatch:
        """The scene parameters of the given indices (no rendering)."""
        for i in indices:
            if not 0 <= int(i) < self.size:
                raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        return _stack([self._sample_params(self._rng(int(i))) for i in indices])

    def batch(self, indices: Sequence[int]) -> dict:
        """Samples for many indices at once, stacked: ``image`` (B, 3, H, W) in [-1, 1], each
        condition (B, 3, H, W) in [0, 1], ``layers`` (B, H, W), ``shape_masks`` (B, slots, H, W),
        ``prompt`` (list of B strings). Identical, byte for byte, to stacking ``self[i]``."""
        scenes = self.scenes(indices)
        rngs = [self._rng(int(i), stream=1) for i in indices]
        out = _render(scenes, self.resolution, self.conditions, rngs, self.palette)
        return _to_sample(out, scenes.prompts())

    def __getitem__(self, index: int) -> dict:
        sample = self.batch([index])
        return {key: value[0] for key, value in sample.items()}


class FillDataset(_ProceduralDataset):
    """Fill: a coloured circle on a coloured background; condition: its outline (Fill50K in
    miniature). Radius 12% to 38% of the image side, centre anywhere that keeps it inside."""

    family = "fill"
    conditions = ("outline",)

    def _sample_params(self, rng: np.random.Generator) -> dict:
        return _sample_fill(rng, self.resolution)


class ShapesDataset(_ProceduralDataset):
    """Shapes: 1 to 3 coloured shapes drawn back to front on a coloured background, with all of
    :data:`CONDITIONS` and the per-pixel class ``labels``."""

    family = "shapes"
    conditions = CONDITIONS

    def _sample_params(self, rng: np.random.Generator) -> dict:
        return _sample_shapes(rng, self.resolution)
