"""The procedural world: deterministic samples whose conditions match their images exactly."""

import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnet.world.data import (
    COLOUR_NAMES,
    CONDITIONS,
    PALETTE_RGB,
    SEGMENTATION_COLOURS,
    SHAPES,
    FillDataset,
    ShapesDataset,
    check_resolution,
    outline_of,
    region_inside,
    render_fill,
    render_shapes,
)

INDICES = list(range(0, 400, 7))


def _bytes(sample: dict) -> dict:
    return {k: (v if isinstance(v, str) else v.numpy().tobytes()) for k, v in sample.items()}


@pytest.mark.parametrize("cls", [FillDataset, ShapesDataset])
def test_same_index_same_bytes_in_any_order_and_any_instance(cls):
    a, b = cls(1000, seed=3), cls(1000, seed=3)
    first = [_bytes(a[i]) for i in (5, 17, 5)]
    assert first[0] == first[2]
    assert _bytes(b[17]) == first[1]
    batch = b.batch([17, 5])
    for row, single in zip((0, 1), (first[1], first[0]), strict=True):
        assert (
            _bytes({k: v[row] if not isinstance(v, list) else v[row] for k, v in batch.items()})
            == single
        )


@pytest.mark.parametrize("cls", [FillDataset, ShapesDataset])
def test_seed_and_split_change_the_samples(cls):
    base = cls(100, seed=0)[4]["image"]
    assert not torch.equal(base, cls(100, seed=1)[4]["image"])
    assert not torch.equal(base, cls(100, split="eval", seed=0)[4]["image"])


def test_samples_follow_sd_conventions():
    sample = ShapesDataset(10).batch([0, 1, 2])
    assert sample["image"].shape == (3, 3, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    for name in CONDITIONS:
        assert sample[name].shape == (3, 3, 64, 64), name
        assert sample[name].min() >= 0 and sample[name].max() <= 1, name


def _vectorised_outline(mask: torch.Tensor) -> torch.Tensor:
    """Inner boundary computed independently: mask minus its 4-neighbour erosion, with the
    image border counting as inside (a shape touching the border has no edge there)."""
    padded = F.pad(mask[:, None].float(), (1, 1, 1, 1), mode="replicate")
    cross = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])[None, None]
    eroded = F.conv2d(padded, cross)[:, 0] == 5
    return mask & ~eroded


def test_fill_outline_is_the_boundary_of_the_filled_circle_and_colours_match_prompt():
    data = FillDataset(1000, split="eval")
    batch = data.batch(INDICES)
    mask = batch["layers"] > 0
    outline = batch["outline"][:, 0] > 0
    assert torch.equal(outline, _vectorised_outline(mask))
    assert torch.equal(outline & ~mask, torch.zeros_like(outline))  # the line is on the region
    for b, prompt in enumerate(batch["prompt"]):
        fg, _, _, bg, _ = prompt.split()
        assert prompt == f"{fg} circle with {bg} background"
        fg_rgb = torch.from_numpy(PALETTE_RGB[COLOUR_NAMES.index(fg)]) * 2 - 1
        bg_rgb = torch.from_numpy(PALETTE_RGB[COLOUR_NAMES.index(bg)]) * 2 - 1
        pixels = batch["image"][b].permute(1, 2, 0)
        assert torch.equal(pixels[mask[b]], fg_rgb.expand(int(mask[b].sum()), 3))
        assert torch.equal(pixels[~mask[b]], bg_rgb.expand(int((~mask[b]).sum()), 3))
        # The outline alone gives the region back: what it takes the ControlNet to fill.
        assert np.array_equal(region_inside(outline[b].numpy()), mask[b].numpy())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cx=st.floats(5, 27), cy=st.floats(5, 27), r=st.floats(1.5, 4.5))
def test_region_inside_inverts_outline_for_any_circle(cx, cy, r):
    sample = render_fill("red", "blue", cx, cy, r)
    mask = (sample["layers"][0] > 0).numpy()
    assert np.array_equal(region_inside(outline_of(mask[None])[0]), mask)


def test_fill_radius_and_centre_vary_widely():
    scenes = FillDataset(5000).scenes(range(500))
    radius = scenes.r[:, 0] / 64
    assert radius.min() < 0.14 and radius.max() > 0.36
    assert scenes.cx.min() < 14 and scenes.cx.max() > 50


def test_shapes_labels_depth_and_segmentation_cover_the_rendered_shapes():
    data = ShapesDataset(1000, split="eval")
    batch = data.batch(INDICES)
    scenes = data.scenes(INDICES)
    for b in range(len(INDICES)):
        layers = batch["layers"][b]
        front = (layers - 1).clamp(min=0)
        on_shape = layers > 0
        # colours: each pixel shows its front shape's colour, the background elsewhere
        colour = torch.from_numpy(scenes.colour[b])[front]
        colour[~on_shape] = int(scenes.background[b])
        expected = torch.from_numpy(PALETTE_RGB)[colour].permute(2, 0, 1) * 2 - 1
        assert torch.equal(batch["image"][b], expected)
        # segmentation: the class of the front shape, background 0, in its class colour
        labels = torch.from_numpy(scenes.shape[b])[front] + 1
        labels[~on_shape] = 0
        assert torch.equal(batch["labels"][b], labels)
        seg = torch.from_numpy(SEGMENTATION_COLOURS)[labels].permute(2, 0, 1)
        assert torch.equal(batch["segmentation"][b], seg)
        # depth: the front shape's nearness, 0 on the background, nearer = drawn later
        depth = batch["depth"][b, 0]
        assert torch.equal(depth > 0, on_shape)
        nearness = torch.from_numpy(scenes.nearness[b])
        assert torch.equal(depth[on_shape], nearness[front][on_shape])
        assert torch.all(nearness[1:] >= nearness[:-1])
        # the full masks, drawn back to front, give the layer map
        rebuilt = torch.zeros_like(layers)
        for k, m in enumerate(batch["shape_masks"][b]):
            rebuilt[m] = k + 1
        assert torch.equal(rebuilt, layers)


def test_shapes_edges_lie_on_shape_boundaries():
    batch = ShapesDataset(1000).batch(INDICES)
    layers = batch["layers"]
    outline = batch["outline"][:, 0] > 0
    assert torch.equal(outline, torch.from_numpy(outline_of(layers.numpy())))
    boundary_band = F.max_pool2d(outline[:, None].float(), 3, 1, 1)[:, 0] > 0
    band2 = F.max_pool2d(outline[:, None].float(), 5, 1, 2)[:, 0] > 0
    canny = batch["canny"][:, 0] > 0
    assert canny.any()
    assert not (canny & ~boundary_band).any()  # Canny fires only next to true boundaries
    scribble = batch["scribble"][:, 0] > 0
    assert not (scribble & ~band2).any()  # a scribble strays at most 2 px from the outline
    assert scribble.sum() < outline.sum()  # and is broken in places
    # The Canny map is OpenCV's on the rendered bytes, nothing else.
    rgb8 = np.round((batch["image"][0].permute(1, 2, 0).numpy() + 1) / 2 * 255).astype(np.uint8)
    reference = cv2.Canny(cv2.cvtColor(rgb8, cv2.COLOR_RGB2GRAY), 100, 200) > 0
    assert np.array_equal(canny[0].numpy(), reference)


def test_shapes_prompts_name_every_shape_and_colour_back_to_front():
    data = ShapesDataset(100)
    scenes = data.scenes(range(20))
    for b, prompt in enumerate(data.batch(range(20))["prompt"]):
        parts = [
            f"{COLOUR_NAMES[c]} {SHAPES[s]}"
            for c, s, p in zip(scenes.colour[b], scenes.shape[b], scenes.present[b], strict=True)
            if p
        ]
        assert (
            prompt == " and ".join(parts) + f" with {COLOUR_NAMES[scenes.background[b]]} background"
        )


def test_render_shapes_from_names_matches_a_hand_check():
    sample = render_shapes([("red", "square", 10, 10, 5), ("blue", "circle", 14, 14, 4)], "white")
    assert sample["prompt"] == ["red square and blue circle with white background"]
    image = sample["image"][0]
    blue = torch.tensor(PALETTE_RGB[COLOUR_NAMES.index("blue")]) * 2 - 1
    assert torch.equal(image[:, 14, 14], blue)  # the circle is in front where they overlap


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: render_fill("mauve", "blue", 16, 16, 5), "unknown colour 'mauve'"),
        (lambda: render_shapes([("red", "hexagon", 16, 16, 5)], "blue"), "unknown shape"),
        (lambda: render_shapes([("red", "circle", 16, 16, 4)] * 4, "blue"), "1 to 3 shapes"),
        (lambda: FillDataset(10, resolution=30), "divisible by 4"),
        (lambda: check_resolution(8), ">= 16"),
        (lambda: FillDataset(10, split="test"), "unknown split"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_index_out_of_range():
    with pytest.raises(IndexError):
        FillDataset(10)[10]


def test_batched_generation_is_fast():
    data = ShapesDataset(10_000)
    data.batch(range(8))  # warm-up
    start = time.perf_counter()
    data.batch(range(256))
    # A U-Net training step on 64 images takes ~0.5 s on one CPU thread; rendering must not
    # compete with it. Generous bound for a loaded machine.
    assert time.perf_counter() - start < 1.5


@pytest.mark.parametrize("family", [FillDataset, ShapesDataset])
def test_a_style_repaints_the_same_scenes_and_nothing_else(family):
    from cnet.world.data import STYLES
    from cnet.world.metrics import classify_colours

    plain, cycled = (
        family(size=16, split="eval", style=s).batch(range(16)) for s in ("plain", "cycled")
    )
    assert plain["prompt"] == cycled["prompt"]
    for key in plain:  # Canny edges are found in the painted image, so they may differ
        if key not in ("image", "prompt", "canny"):
            assert torch.equal(plain[key], cycled[key]), key
    names = classify_colours(plain["image"])
    # every pixel of colour c is painted with the next palette colour, exactly
    expected = torch.from_numpy(STYLES["cycled"])[names].permute(0, 3, 1, 2) * 2 - 1
    assert torch.equal(cycled["image"], expected)
    assert torch.equal(classify_colours(cycled["image"], "cycled"), names)
    with pytest.raises(ValueError, match="style: 'neon' is not allowed; expected one of plain, "):
        family(size=1, style="neon")
