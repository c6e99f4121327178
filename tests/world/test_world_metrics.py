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
