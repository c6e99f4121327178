"""Fidelity metrics on hand-made cases with known answers, and on the world's own samples
(where a perfect generator must score perfectly)."""

import pytest
import torch

from cnet.world.data import COLOUR_NAMES, PALETTE_RGB, FillDataset, ShapesDataset, render_shapes
from cnet.world.metrics import (
    classify_colours,
    colours_drawn,
    depth_order_accuracy,
    edge_f1,
    fit_shape,
    iou,
    mean_iou,
)


def _box(top: int, left: int, height: int, width: int, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, top : top + height, left : left + width] = True
    return mask


def test_iou_of_two_shifted_squares_is_one_third():
    # 4x4 squares overlapping in 4x2 pixels: 8 / (16 + 16 - 8)
    assert iou(_box(0, 0, 4, 4), _box(0, 2, 4, 4)).item() == pytest.approx(1 / 3)
    assert iou(_box(0, 0, 4, 4), _box(4, 4, 4, 4)).item() == 0.0
    empty = torch.zeros(1, 8, 8, dtype=torch.bool)
    assert iou(empty, empty).item() == 1.0
    dot = _box(3, 3, 1, 1)  # a union of one pixel
    assert iou(dot, dot).item() == 1.0 and iou(dot, empty).item() == 0.0


def test_mean_iou_per_class_and_mean():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    predicted = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    result = mean_iou(predicted, target, num_classes=3)
    # class 0: 4 / 5; class 1: 3 / 4; class 2 never occurs and is left out of the mean
    assert result["per_class"] == [pytest.approx(0.8), pytest.approx(0.75), None]
    assert result["miou"] == pytest.approx((0.8 + 0.75) / 2)


def test_edge_f1_tolerance_and_partial_recall():
    line = _box(2, 1, 1, 6)
    shifted = _box(3, 1, 1, 6)
    half = _box(2, 1, 1, 3)
    assert edge_f1(line, line).item() == 1.0
    assert edge_f1(shifted, line, tolerance=1).item() == pytest.approx(1.0)
    assert edge_f1(shifted, line, tolerance=0).item() == 0.0
    # precision 1, recall 1/2 -> F1 = 2/3
    assert edge_f1(half, line, tolerance=0).item() == pytest.approx(2 / 3)
    empty = torch.zeros(1, 8, 8, dtype=torch.bool)
    assert edge_f1(empty, empty).item() == 1.0 and edge_f1(empty, line).item() == 0.0


def test_classify_colours_recovers_every_palette_entry_under_small_noise():
    rgb = torch.from_numpy(PALETTE_RGB).T[None, :, :, None] * 2 - 1  # (1, 3, colours, 1)
    noisy = rgb + 0.08 * torch.randn(rgb.shape, generator=torch.Generator().manual_seed(0))
    assert classify_colours(noisy)[0, :, 0].tolist() == list(range(len(COLOUR_NAMES)))


def test_world_images_adhere_to_their_prompts_and_swapped_ones_do_not():
    batch = FillDataset(1000, split="eval").batch(range(64))
    words = [p.split() for p in batch["prompt"]]
    fg, bg = [[w[0]] for w in words], [w[3] for w in words]
    assert colours_drawn(batch["image"], fg, bg)["both_ok"].all()
    # the same images judged against the prompts with colours swapped: every check fails
    swapped = colours_drawn(batch["image"], [[b] for b in bg], [f[0] for f in fg])
    assert not swapped["background_ok"].any()


def test_depth_order_is_read_from_which_colour_is_on_top():
    back_to_front = [("red", "square", 12, 12, 6), ("blue", "circle", 18, 18, 5)]
    sample = render_shapes(back_to_front, "white")
    right = depth_order_accuracy(sample["image"], sample["shape_masks"], [["red", "blue"]])
    assert right == {"accuracy": 1.0, "pairs": 1}
    # the same picture, claimed to have the circle behind the square
    wrong = depth_order_accuracy(
        sample["image"], sample["shape_masks"][:, [1, 0]], [["blue", "red"]]
    )
    assert wrong == {"accuracy": 0.0, "pairs": 1}


def test_depth_order_accuracy_of_world_images_is_perfect():
    data = ShapesDataset(1000, split="eval")
    indices = list(range(64))
    batch, scenes = data.batch(indices), data.scenes(indices)
    colours = [
        [COLOUR_NAMES[c] for c, p in zip(scenes.colour[b], scenes.present[b], strict=True) if p]
        for b in range(64)
    ]
    masks = batch["shape_masks"]
    result = depth_order_accuracy(batch["image"], masks, colours)
    assert result["pairs"] > 5 and result["accuracy"] == 1.0


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond"])
def test_fit_shape_names_each_rendered_shape(shape):
    sizes = [4.0, 5.5, 7.0]
    masks = torch.cat(
        [render_shapes([("red", shape, 15.3, 16.2, r)], "blue")["layers"] > 0 for r in sizes]
    )
    result = fit_shape(masks)
    assert result["shape"] == [shape] * len(sizes)
    assert (result["iou"].max(dim=1).values > 0.9).all()


def test_fit_shape_of_empty_mask_is_none():
    result = fit_shape(torch.zeros(1, 32, 32, dtype=torch.bool))
    assert result["shape"] == [None] and result["iou"].max() == 0


def test_layout_iou_ignores_which_colour_fills_the_region():
    from cnet.world.metrics import fidelity, layout_iou

    scenes = FillDataset(size=4, split="eval").scenes(range(4))
    plain, cycled = (
        FillDataset(size=4, split="eval", style=s).batch(range(4)) for s in ("plain", "cycled")
    )
    region = plain["layers"] > 0
    foreground, background = (
        torch.from_numpy(a.copy()) for a in (scenes.colour[:, 0], scenes.background)
    )
    exact = fidelity(plain["image"], foreground, background, region)
    assert torch.equal(exact["iou"], torch.ones(4))
    assert torch.equal(exact["layout_iou"], exact["iou"])
    # the same discs painted in other colours: no prompted colour is drawn, the layout is exact
    repainted = fidelity(cycled["image"], foreground, background, region)
    assert torch.equal(repainted["iou"], torch.zeros(4))
    assert torch.equal(repainted["layout_iou"], torch.ones(4))
    # one colour everywhere: |R| / HW, as for the prompted IoU of an image all in that colour
    flat = torch.ones_like(plain["image"])
    area = region.flatten(1).float().mean(1)
    torch.testing.assert_close(layout_iou(flat, region), area, rtol=0, atol=1e-7)


def test_edge_f1_is_per_image_with_a_one_pixel_default_tolerance():
    line = _box(2, 1, 1, 6)
    assert edge_f1(_box(3, 1, 1, 6), line).item() == 1.0  # one pixel off: within the default
    assert edge_f1(_box(4, 1, 1, 6), line).item() == 0.0  # two pixels off: not
    # one predicted pixel on the line: precision 1/1, recall 1/6, F1 = 2/7
    dot = _box(2, 1, 1, 1)
    assert edge_f1(dot, line, tolerance=0).item() == pytest.approx(2 / 7)
    # and the other way round: one target pixel, found
    assert edge_f1(line, dot, tolerance=0).item() == pytest.approx(2 / 7)
    # precision 1/2 and recall 1/4: F1 = 2 * 1/8 / (3/4) = 1/3
    quarter = _box(2, 1, 1, 2)
    predicted = quarter | _box(6, 1, 1, 2)
    assert edge_f1(predicted, _box(2, 0, 1, 8), tolerance=0).item() == pytest.approx(1 / 3)
    # a batch: each image scored on its own pixels, not the batch's sums
    batch = edge_f1(torch.cat([dot, line]), torch.cat([line, line]), tolerance=0)
    assert batch.tolist() == pytest.approx([2 / 7, 1.0])


def test_depth_order_counts_only_overlapping_pairs_and_a_tie_is_no_vote():
    """Hand-made masks and colours: slot 0 (back) and slot 1 do not overlap; slot 2 (front)
    overlaps slot 0 on 4 pixels."""
    masks = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    masks[0, 0, 0:4, 0:4] = True
    masks[0, 1, 6:8, 6:8] = True
    masks[0, 2, 2:4, 2:6] = True  # over slot 0 at rows 2-3, columns 2-3
    colours = [["red", "green", "blue"]]
    palette = {n: torch.tensor(PALETTE_RGB[COLOUR_NAMES.index(n)]) * 2 - 1 for n in colours[0]}
    image = torch.zeros(1, 3, 8, 8)
    image[0, :, 2:4, 2:4] = palette["blue"][:, None, None]  # the front one on top
    result = depth_order_accuracy(image, masks, colours)
    assert result == {"accuracy": 1.0, "pairs": 1}  # the first pair had no overlap: skipped
    image[0, :, 2:4, 2] = palette["red"][:, None]  # half the overlap red, half blue: a tie
    assert depth_order_accuracy(image, masks, colours) == {"accuracy": 0.0, "pairs": 1}
    apart = masks.clone()
    apart[0, 2] = False
    assert depth_order_accuracy(image, apart, colours) == {"accuracy": None, "pairs": 0}


def test_fit_shape_is_the_best_of_its_placements_around_the_centroid():
    """The docstring's definition, computed here by placing every template: centroid of the
    pixel centres, equal-area radius, nudged by -1/0/+1 px and scaled by 0.85 to 1.15."""
    import numpy as np

    from cnet.world.data import SHAPES, every_shape_mask

    masks = []
    for shape, r, cut in [("circle", 6.0, 3), ("square", 5.0, 2), ("triangle", 7.0, 4),
                          ("diamond", 6.5, 3), ("circle", 4.5, 0)]:  # fmt: skip
        mask = render_shapes([("red", shape, 15.3, 16.2, r)], "blue")["layers"][0] > 0
        mask[: 16 - cut // 2, : 16 + cut] = False  # a corner cut off: the centroid moves
        masks.append(mask[:32, :32])
    disc = render_shapes([("red", "circle", 15.5, 15.5, 5.0)], "blue")["layers"][0, :32, :32] > 0
    fragment = disc.clone()
    fragment[14:18, 27:31] = True  # to the right: the best fits nudge left and shrink
    scattered = disc.clone()
    scattered[[2, 2, 29, 29, 2, 29, 15, 15], [2, 29, 2, 29, 15, 15, 2, 29]] = True  # area grows
    masks = torch.stack([torch.zeros(32, 32, dtype=torch.bool), *masks, fragment, scattered])
    result = fit_shape(masks)
    assert result["shape"][0] is None and result["iou"][0].max() == 0
    nudges = [(dx, dy, k) for dx in (-1, 0, 1) for dy in (-1, 0, 1)
              for k in (0.85, 0.925, 1.0, 1.075, 1.15)]  # fmt: skip
    best_placements = set()
    for b in range(1, len(masks)):
        ys, xs = np.nonzero(masks[b].numpy())
        cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, len(xs)
        r = np.sqrt(area / np.pi)
        placed = every_shape_mask(
            np.array([cx + n[0] for n in nudges]),
            np.array([cy + n[1] for n in nudges]),
            np.array([r * n[2] for n in nudges]),
            32,
        )  # (shapes, placements, H, W)
        ious = iou(
            torch.from_numpy(placed).flatten(0, 1),
            masks[b].expand(placed[0].shape[0] * len(SHAPES), -1, -1),
        )
        ious = ious.view(len(SHAPES), len(nudges))
        assert result["iou"][b].tolist() == pytest.approx(ious.amax(1).tolist(), abs=1e-6)
        best_placements |= {nudges[int(i)] for i in ious.argmax(1)}
    # the masks make the nudges and scales matter: the best placements include a nudge left
    # and both smaller scales, so fit_shape's fits above match only if it tries them
    assert {(-1, 0, 0.85), (-1, 0, 0.925)} <= best_placements


def test_layout_iou_and_mean_iou_edges():
    from cnet.world.metrics import layout_iou, sampler_settings

    images, region = torch.zeros(2, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError):  # one region per image
        layout_iou(images, region)
    # no class occurs in either map: nothing to average, a perfect (vacuous) score
    labels = torch.full((2, 4), 5)
    assert mean_iou(labels, labels, num_classes=3) == {"miou": 1.0, "per_class": [None] * 3}
    settings = sampler_settings("quick")
    assert settings == {"steps": 10, "guidance": 3.0}
    settings["steps"] = 1  # a copy: the profile's sampler stays as it is
    assert sampler_settings("quick")["steps"] == 10


def test_values_beyond_the_range_count_as_their_clamped_value():
    """A decoder can overshoot [-1, 1]; a pixel is classified as its clamped value (what an
    8-bit save of the image keeps), below the range and above it."""
    pixels = torch.tensor([[-2.0, -2.0, 0.25], [-1.0, 1.75, -0.25]]).T[None, :, :, None]
    clamped = classify_colours(pixels.clamp(-1, 1))[0, :, 0]
    assert torch.equal(classify_colours(pixels)[0, :, 0], clamped)
    # unclamped, both would be other colours: the clamp decides here
    rgb = (pixels + 1) / 2
    palette = torch.from_numpy(PALETTE_RGB).float()
    unclamped = ((rgb[:, None] - palette[None, :, :, None, None]) ** 2).sum(2).argmin(1)
    assert (unclamped[0, :, 0] != clamped).all()


def _paint(indices: torch.Tensor) -> torch.Tensor:
    """(B, H, W) palette indices -> (B, 3, H, W) images in [-1, 1] of exactly those colours."""
    return (torch.from_numpy(PALETTE_RGB).float()[indices] * 2 - 1).permute(0, 3, 1, 2)


def test_the_background_is_the_majority_of_the_border_ring():
    """Random 6x6 images of three colours: the background judged right is, in every image,
    the most frequent colour of the pixels in the outermost row or column (first on ties)."""
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([0, 4, 8])[torch.randint(0, 3, (300, 6, 6), generator=g)]
    ring = torch.zeros(6, 6, dtype=torch.bool)
    ring[[0, -1]] = True
    ring[:, [0, -1]] = True
    majority = [
        int(torch.bincount(image[ring], minlength=len(COLOUR_NAMES)).argmax()) for image in indices
    ]
    result = colours_drawn(_paint(indices), [["red"]] * 300, [COLOUR_NAMES[m] for m in majority])
    assert result["background_ok"].all()


def test_the_foreground_needs_its_share_and_the_majority_of_the_rest():
    """A 20x20 blue image with a few pixels of other colours, red asked for: red must cover at
    least min_fraction (1 %, 4 pixels) and be more than half of what is not background."""
    red, green, blue = (COLOUR_NAMES.index(c) for c in ("red", "green", "blue"))

    def judged(n_red: int, n_green: int) -> bool:
        image = torch.full((1, 20, 20), blue)
        image.view(-1)[:n_red] = red
        image.view(-1)[100 : 100 + n_green] = green
        result = colours_drawn(_paint(image), [["red"]], ["blue"])
        assert result["background_ok"].item()
        return bool(result["foreground_ok"].item())

    assert judged(4, 0) and not judged(3, 0)  # the share: exactly 4 pixels pass, 3 do not
    assert judged(5, 4) and not judged(4, 4)  # more than half of the rest, not half
    assert not judged(4, 5) and not judged(4, 7)  # a minority of the rest fails
    with pytest.raises(ValueError):  # one background per image
        colours_drawn(_paint(torch.full((2, 4, 4), blue)), [["red"]] * 2, ["blue"])


def test_colours_are_named_in_the_styles_palette():
    """The same discs painted in the cycled style: judged in that style's palette, every
    colour and the region are right; in the plain palette they are not."""
    from cnet.world.metrics import fidelity

    scenes = FillDataset(size=4, split="eval").scenes(range(4))
    cycled = FillDataset(size=4, split="eval", style="cycled").batch(range(4))
    region = cycled["layers"] > 0
    foreground, background = (
        torch.from_numpy(a.copy()) for a in (scenes.colour[:, 0], scenes.background)
    )
    right = fidelity(cycled["image"], foreground, background, region, style="cycled")
    assert torch.equal(right["iou"], torch.ones(4)) and right["colours_ok"].all()
    assert torch.equal(right["layout_iou"], torch.ones(4))
    plain = fidelity(cycled["image"], foreground, background, region)
    assert not plain["colours_ok"].any()


def test_off_blend_distance_is_zero_on_every_blend_and_the_distance_to_the_segment_off_it():
    import numpy as np

    from cnet.world.data import colour_index, palette_of
    from cnet.world.metrics import off_blend_distance

    fg, bg = colour_index("red"), colour_index("cyan")
    palette = palette_of("plain").astype(np.float64)
    blends = [(1 - t) * palette[fg] + t * palette[bg] for t in np.linspace(0, 1, 11)]
    others = [palette[i] for i in range(len(palette)) if i not in (fg, bg)] + [np.zeros(3)]
    rgb = torch.tensor(np.stack(blends + others), dtype=torch.float32)  # (P, 3) in [0, 1]
    images = (rgb.T[None, :, :, None] * 2 - 1).expand(1, 3, len(rgb), 1)
    distance = off_blend_distance(images, torch.tensor([fg]), torch.tensor([bg]))[0, :, 0]
    assert distance[: len(blends)].abs().max() < 1e-6
    # off the segment: its distance to a dense sampling of the segment, in float64
    t = np.linspace(0, 1, 100_001)[:, None]
    segment = (1 - t) * palette[fg] + t * palette[bg]
    expected = [np.linalg.norm(segment - c, axis=1).min() for c in others]
    assert np.allclose(distance[len(blends) :].numpy(), expected, atol=1e-5)


def test_worst_specks_finds_a_dark_pixel_on_the_edge_and_one_away_from_it():
    from cnet.world.data import colour_index
    from cnet.world.metrics import SPECK_DISTANCE, worst_specks

    batch = FillDataset(1000, split="eval").batch(range(8))
    words = [p.split() for p in batch["prompt"]]
    fg = torch.tensor([colour_index(w[0]) for w in words])
    bg = torch.tensor([colour_index(w[3]) for w in words])
    region = torch.as_tensor(batch["layers"]) > 0
    clean = worst_specks(batch["image"], fg, bg, region)
    assert clean["edge"].max() < 1e-6 and clean["away"].max() < 1e-6  # the world has none
    images = batch["image"].clone()
    ys, xs = torch.nonzero(region[0] & ~torch.roll(region[0], 1, 0), as_tuple=True)  # top rim
    images[0, :, ys[0], xs[0]] = -1.0  # a black pixel on the circle's edge
    images[1, :, 0, 0] = -1.0  # and one in the corner, far from it
    found = worst_specks(images, fg, bg, region)
    assert found["edge"][0] >= SPECK_DISTANCE and found["away"][0] < 1e-6
    assert found["away"][1] >= SPECK_DISTANCE and found["edge"][1] < 1e-6
    assert torch.equal(found["edge"][2:], clean["edge"][2:])


def test_speck_positions_names_where_on_the_rim_a_planted_speck_sits():
    import math

    from cnet.world.data import colour_index
    from cnet.world.metrics import (
        RIM_POSITIONS,
        SPECK_DISTANCE,
        off_blend_distance,
        speck_positions,
    )

    batch = FillDataset(1000, split="eval").batch(range(4))
    words = [p.split() for p in batch["prompt"]]
    fg = torch.tensor([colour_index(w[0]) for w in words])
    bg = torch.tensor([colour_index(w[3]) for w in words])
    region = torch.as_tensor(batch["layers"]) > 0
    assert speck_positions(batch["image"], fg, bg, region) == [None] * 4  # the world has none
    image, circle = batch["image"][:1], region[:1]
    # a colour off the blend of image 0's two colours: black, or white where black is one of them
    speck = next(
        torch.full((3,), v)
        for v in (-1.0, 1.0)
        if off_blend_distance(torch.full((1, 3, 1, 1), v), fg[:1], bg[:1]) >= SPECK_DISTANCE
    )
    inside = circle[0].double()
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centre_row, centre_col = (
        (inside * rows).sum() / inside.sum(),
        (inside * cols).sum() / inside.sum(),
    )
    rim = circle[0] & ~(
        torch.roll(circle[0], 1, 0)
        & torch.roll(circle[0], -1, 0)
        & torch.roll(circle[0], 1, 1)
        & torch.roll(circle[0], -1, 1)
    )
    rim_rows, rim_cols = torch.nonzero(rim, as_tuple=True)
    # without angles: the rim's topmost pixel is at 12:00, its rightmost at 3:00
    for position, pixel in (("12:00", rim_rows.argmin()), ("3:00", rim_cols.argmax())):
        planted = image.clone()
        planted[0, :, rim_rows[pixel], rim_cols[pixel]] = speck
        assert speck_positions(planted, fg[:1], bg[:1], circle) == [position]
    for k, position in enumerate(RIM_POSITIONS):
        # the rim pixel nearest the direction 45k degrees clockwise from up
        angle = torch.atan2(rim_cols - centre_col, centre_row - rim_rows)
        gap = torch.remainder(angle - math.radians(45 * k) + math.pi, 2 * math.pi) - math.pi
        nearest = gap.abs().argmin()
        assert gap[nearest].abs() < math.radians(10)
        planted = image.clone()
        planted[0, :, rim_rows[nearest], rim_cols[nearest]] = speck
        assert speck_positions(planted, fg[:1], bg[:1], circle) == [position]
