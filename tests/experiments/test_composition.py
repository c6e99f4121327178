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
