"""Two ControlNets at once (ICCV §3.4): the two-object scenes, and composition by adding
residuals giving what diffusers' MultiControlNetModel gives, on the shipped ControlNets."""

import pytest
import torch
import torch.nn.functional as F

from cnet.course.figures import repo_root
from cnet.experiments.composition import composition_scenes

MODELS = repo_root() / "models"


def test_scenes_are_two_objects_apart_each_asked_for_by_its_own_condition():
    data = composition_scenes(16, seed=3)
    again = composition_scenes(16, seed=3)
    assert data.prompts == again.prompts and torch.equal(data.merged, again.merged)
    circle, shape = data.regions[:, 0], data.regions[:, 1]
    assert circle.flatten(1).any(1).all() and shape.flatten(1).any(1).all()
    assert not (circle & shape).any()
    # each condition shows its own object only
    drawn = [c.amax(dim=1) > 0 for c in (data.outline, data.segmentation, data.merged)]
    near_circle = F.max_pool2d(circle[:, None].float(), 3, 1, 1)[:, 0] > 0
    assert (drawn[0] <= near_circle).all() and drawn[0].flatten(1).any(1).all()
    assert torch.equal(drawn[1], shape) and torch.equal(drawn[2], circle | shape)
    assert all(" circle and " in p and p.endswith(" background") for p in data.prompts)
    assert (data.colours[:, 0] != data.colours[:, 1]).all()
    assert (data.colours != data.background[:, None]).all()


@pytest.mark.slow
@pytest.mark.skipif(
    not (MODELS / "controlnet-segmentation").exists(),
    reason="the shipped segmentation ControlNet is not in this checkout",
)
def test_residuals_added_are_diffusers_multicontrolnet_on_the_shipped_controlnets():
    from diffusers import StableDiffusionControlNetPipeline

    from cnet import ControlledUNet, to_diffusers
    from cnet.sample import sample
    from cnet.train import load_base, load_controlnet

    torch.set_num_threads(2)
    base = load_base(MODELS / "miniature-sd")
    fill, segmentation = (
        load_controlnet(MODELS / n) for n in ("controlnet-fill", "controlnet-segmentation")
    )
    data = composition_scenes(4)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = StableDiffusionControlNetPipeline(
        **base.components,
        controlnet=[to_diffusers(fill), to_diffusers(segmentation)],
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = (
        pipe(
            data.prompts,
            image=[data.outline, data.segmentation],
            num_inference_steps=10,
            guidance_scale=3.0,
            latents=latents.clone(),
            output_type="pt",
        ).images
        * 2
        - 1
    )
    ours = sample(
        base,
        ControlledUNet(base.unet, [fill, segmentation]),
        data.prompts,
        [data.outline, data.segmentation],
        num_inference_steps=10,
        guidance_scale=3.0,
        latents=latents.clone(),
    )
    assert type(pipe.controlnet).__name__ == "MultiControlNetModel"
    assert (ours - theirs).abs().max() <= 2e-5


def _painted(data) -> torch.Tensor:
    """Each scene drawn exactly as asked: its background, the circle and the other shape in
    their prompted colours, in [-1, 1]."""
    from cnet.world.palette import PALETTE_RGB

    rgb = torch.from_numpy(PALETTE_RGB)
    images = rgb[data.background][:, :, None, None].expand(-1, -1, *data.regions.shape[-2:])
    images = images.clone()
    for k in range(2):
        colour = rgb[data.colours[:, k]][:, :, None, None]
        images = torch.where(data.regions[:, k : k + 1], colour, images)
    return images * 2 - 1


def test_each_composition_row_feeds_its_controlnets_their_own_conditions(monkeypatch):
    """The sweep's rows, with sampling replaced by a recorder: each row gives each ControlNet
    its own condition map (the circle's outline to Fill, the shape's class map, or both
    objects' map, to segmentation), and each object is measured on its own region and colour
    (an exact scene scores IoU 1 on both, the scene with its objects' colours swapped 0)."""
    import cnet.experiments.composition as composition
    from cnet.train import load_base, load_controlnet

    base = load_base(MODELS / "miniature-sd")
    fill, segmentation = (load_controlnet(MODELS / "controlnet-fill") for _ in range(2))
    data = composition_scenes(3, seed=1)
    fed = {}

    def record(pipe, controlled, prompts, conditions, steps, guidance):
        nets = [] if controlled is None else list(controlled.controlnets)
        maps = [] if conditions is None else conditions
        fed[len(fed)] = (nets, [maps] if torch.is_tensor(maps) else list(maps))
        assert prompts == data.prompts
        return _painted(data)

    monkeypatch.setattr(composition, "sample_set", record)
    rows, images = composition.composition_sweep(base, fill, segmentation, data, steps=2)
    expected = {
        "base alone": ([], []),
        "Fill alone": ([fill], [data.outline]),
        "segmentation alone": ([segmentation], [data.segmentation]),
        "both, residuals added": ([fill, segmentation], [data.outline, data.segmentation]),
        "segmentation, both objects in one map": ([segmentation], [data.merged]),
    }
    assert [row["composition"] for row in rows] == list(expected)
    for k, (nets, maps) in expected.items():
        got_nets, got_maps = fed[list(expected).index(k)]
        assert [id(n) for n in got_nets] == [id(n) for n in nets], k
        assert len(got_maps) == len(maps) and all(map(torch.equal, got_maps, maps)), k
    for row in rows:
        assert row["circle_iou"] == row["shape_iou"] == 1.0 and row["colours_ok"] == 1.0
    assert images.shape == (5, 3, 3, *data.regions.shape[-2:])

    swapped = composition.CompositionData(**{**vars(data), "colours": data.colours.flip(1)})
    monkeypatch.setattr(composition, "sample_set", lambda *args: _painted(swapped))
    rows, _ = composition.composition_sweep(base, fill, segmentation, data, steps=2)
    assert all(row["circle_iou"] == row["shape_iou"] == 0.0 for row in rows)
    assert all(row["circle_layout_iou"] == 1.0 for row in rows)  # colour-blind: still in place
