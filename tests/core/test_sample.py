"""cnet.sample runs diffusers' StableDiffusionControlNetPipeline loop: same images, same seeds."""

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import StableDiffusionControlNetPipeline

from cnet import ControlledUNet, ControlNet, to_diffusers
from cnet.sample import sample
from cnet.world.data import DEFAULT_RESOLUTION as RES

PROMPTS = ["red circle with blue background", "green circle with white background"]


@pytest.fixture(scope="module")
def parts():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    controlnet = ControlNet.from_unet(pipe.unet)
    with torch.no_grad():  # away from zero, so that the control actually changes the images
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    conditions = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return pipe, controlnet, conditions, latents


@pytest.mark.parametrize(
    "guess_mode, guidance_scale",
    [
        pytest.param(False, 1.0, marks=pytest.mark.slow),
        pytest.param(False, 4.0, marks=pytest.mark.slow),
        pytest.param(True, 1.0, marks=pytest.mark.slow),
        # in the fast tier: guess mode under guidance, where only the conditional half of the
        # batch is controlled
        (True, 4.0),
    ],
)
def test_same_images_as_the_diffusers_controlnet_pipeline(parts, guess_mode, guidance_scale):
    pipe, controlnet, conditions, latents = parts
    reference = StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=to_diffusers(controlnet)
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS,
        image=conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        latents=latents.clone(),
        guess_mode=guess_mode,
        output_type="pt",
        height=RES,
        width=RES,
    ).images
    controlled = ControlledUNet(pipe.unet, controlnet)
    got = sample(
        pipe,
        controlled,
        PROMPTS,
        conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        guess_mode=guess_mode,
        guess_rule="diffusers",
        latents=latents.clone(),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5


def test_the_control_matters_and_none_is_the_plain_base(parts):
    pipe, controlnet, conditions, latents = parts
    controlled = ControlledUNet(pipe.unet, controlnet)
    plain = sample(pipe, None, PROMPTS, num_inference_steps=3, latents=latents.clone())
    with_control = sample(
        pipe, controlled, PROMPTS, conditions, num_inference_steps=3, latents=latents.clone()
    )
    assert (plain - with_control).abs().max() > 1e-3
    fresh = ControlledUNet(pipe.unet, ControlNet.from_unet(pipe.unet))
    untrained = sample(
        pipe, fresh, PROMPTS, conditions, num_inference_steps=3, latents=latents.clone()
    )
    assert torch.equal(untrained, plain)  # Eq. 4 through a whole sampling run


@pytest.mark.parametrize("window", [(0.25, 1.0), (0.0, 0.5), (0.25, 0.75)])
def test_control_window_equals_diffusers_control_guidance_start_end(parts, window):
    pipe, controlnet, conditions, latents = parts
    reference = StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=to_diffusers(controlnet)
    )
    reference.set_progress_bar_config(disable=True)
    start, end = window
    expected = reference(
        PROMPTS,
        image=conditions,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=latents.clone(),
        output_type="pt",
        height=RES,
        width=RES,
        control_guidance_start=start,
        control_guidance_end=end,
    ).images
    seen = {}
    got = sample(
        pipe,
        ControlledUNet(pipe.unet, controlnet),
        PROMPTS,
        conditions,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=latents.clone(),
        control_guidance_start=start,
        control_guidance_end=end,
        on_residuals=lambda i, r: seen.setdefault(
            i, max(t.abs().max().item() for t in r.tensors())
        ),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5
    # step i of 4 is controlled iff start <= i/4 and (i+1)/4 <= end; elsewhere exactly zero
    assert sorted(seen) == [0, 1, 2, 3]
    for i, largest in seen.items():
        assert (largest > 0) == (start <= i / 4 and (i + 1) / 4 <= end), (i, largest)
    for start, end in [(0.5, 0.5), (0.0, 1.5), (-0.25, 1.0)]:
        message = (
            f"^control_guidance_start, control_guidance_end: {start}, {end} are not allowed; "
            "expected 0 <= start < end <= 1$"
        )
        with pytest.raises(ValueError, match=message):
            sample(pipe, None, PROMPTS, control_guidance_start=start, control_guidance_end=end)


def test_a_control_window_holds_the_steps_diffusers_rule_gives():
    """Step i of n is controlled when start <= i/n and (i + 1)/n <= end (diffusers' rule);
    a window narrower than one step can hold none."""
    from cnet.sample import controlled_steps

    assert controlled_steps(10, 0.0, 1.0) == list(range(10))
    assert controlled_steps(10, 0.0, 0.5) == [0, 1, 2, 3, 4]
    assert controlled_steps(10, 0.75, 1.0) == [8, 9]
    assert controlled_steps(10, 0.5, 0.55) == [] and controlled_steps(10, 0.15, 0.25) == []
    assert controlled_steps(4, 0.3, 0.7) == []


def test_scales_per_residual_and_several_controlnets_sample_as_their_sum(parts):
    """One scale per residual samples as the same number given once, inside a control window
    too; two ControlNets add their residuals, so a second one that is fresh (zero convolutions)
    changes nothing, bit for bit, whatever its condition."""
    pipe, controlnet, conditions, latents = parts

    def run(nets, conds, scales):
        controlled = ControlledUNet(pipe.unet, nets)
        return sample(
            pipe, controlled, PROMPTS, conds, num_inference_steps=2, guidance_scale=4.0,
            control_guidance_end=0.5, scales=scales, latents=latents.clone(),
        )  # fmt: skip

    once = run(controlnet, conditions, 0.5)
    assert torch.equal(once, run(controlnet, conditions, [0.5] * 13))
    two = [controlnet, ControlNet.from_unet(pipe.unet)]
    other = torch.rand(conditions.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(run(two, [conditions, other], [0.5, 0.5]), once)
    swapped = run(two, [other, conditions], [0.5, 0.5])
    with pytest.raises(ValueError, match="one per ControlNet"):  # a condition too many
        run(controlnet, [conditions, other], 0.5)
    assert not torch.equal(swapped, once)  # each ControlNet is given its own condition


def test_sampling_in_double_precision_casts_the_conditions(parts):
    """A float64 base takes float32 conditions (as the world renders them): cast to the
    U-Net's dtype before they are encoded."""
    pipe, controlnet, conditions, latents = parts
    double = tiny_sd_pipeline().to(torch.float64)
    double.unet.load_state_dict(pipe.unet.state_dict())
    net = ControlNet.from_unet(double.unet)
    net.load_state_dict(controlnet.state_dict())
    got = sample(
        double,
        ControlledUNet(double.unet, net),
        PROMPTS,
        conditions.float(),
        num_inference_steps=2,
        latents=latents.clone(),
    )
    assert got.dtype == torch.float64


# diffusers' Euler scheduler hands numpy a tensor in a way numpy 2 warns about (its code, not ours)
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_a_scheduler_whose_noise_is_not_unit_starts_as_diffusers_does(parts):
    """Euler's starting noise is scaled by its init_noise_sigma (about 14.6 at SD's schedule,
    where DDIM's is 1): the same images as diffusers' own pipeline with that scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe, _, _, latents = parts
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert euler.init_noise_sigma > 1
    reference = StableDiffusionPipeline(**{**pipe.components, "scheduler": euler})
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=latents.clone(),
        output_type="pt",
        height=RES,
        width=RES,
    ).images
    got = sample(
        pipe,
        None,
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=latents.clone(),
        scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5
