"""cnet.controlnet_xs: diffusers' ControlNet-XS on the locked U-Net, the adapter trained in place
inside the fused U-Net; cnet.sample samples it as diffusers' (deprecated)
StableDiffusionControlNetXSPipeline does (same images, same seeds)."""

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import ControlNetXSAdapter, UNetControlNetXSModel
from diffusers.pipelines.deprecated.controlnet_xs import StableDiffusionControlNetXSPipeline

from cnet import ControlNetXSUNet, controlnet_xs_for
from cnet.sample import sample
from cnet.world.data import DEFAULT_RESOLUTION as RES

PROMPTS = ["red circle with blue background", "green circle with white background"]


@pytest.fixture(scope="module")
def parts():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(3)
    adapter = controlnet_xs_for(pipe.unet)
    # the control -> base convolutions start at zero; give them weights, so that the images
    # below depend on every part of the control half
    with torch.no_grad():
        for p in adapter.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    conditions = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return pipe, adapter, conditions, latents


def test_the_fused_unets_control_half_is_the_adapter_and_its_base_half_is_locked(parts):
    pipe, adapter, _, _ = parts
    fused = ControlNetXSUNet(pipe.unet, adapter)
    trainable = {id(p) for p in fused.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    # the base half holds the base's weights
    assert torch.equal(fused.fused.base_conv_in.weight, pipe.unet.conv_in.weight)
    # a change to the adapter is a change to the fused U-Net: what diffusers builds from the
    # changed adapter equals it, weight for weight
    with torch.no_grad():
        adapter.conv_in.weight.add_(1.0)
        rebuilt = UNetControlNetXSModel.from_unet(pipe.unet, adapter).state_dict()
        mine = {k: v.clone() for k, v in fused.fused.state_dict().items()}
        adapter.conv_in.weight.sub_(1.0)
    assert rebuilt.keys() == mine.keys()
    assert all(torch.equal(rebuilt[k], mine[k]) for k in rebuilt)


def test_an_untrained_controlnet_xs_keeps_the_base_bit_for_bit(parts):
    """Its control -> base convolutions start at zero (as Eq. 4's), so the fused U-Net predicts
    exactly what the base does; and at scale 0 or with control off, whatever its weights. Only
    with the base's normalisation epsilons (match_base_norms): diffusers' own fused U-Net
    differs from the base."""
    pipe, trained, conditions, latents = parts
    torch.manual_seed(5)
    fresh = ControlNetXSUNet(pipe.unet, controlnet_xs_for(pipe.unet))
    text = torch.randn(2, 16, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        base = pipe.unet(latents, 500, text).sample
        assert torch.equal(fresh(latents, 500, text, conditions), base)
        weighted = ControlNetXSUNet(pipe.unet, trained)
        assert torch.equal(weighted(latents, 500, text, conditions, 0.0), base)
        assert torch.equal(weighted(latents, 500, text, conditions, apply_control=False), base)
        assert not torch.equal(weighted(latents, 500, text, conditions), base)
        theirs = UNetControlNetXSModel.from_unet(pipe.unet, trained)
        unmatched = theirs(latents, 500, text, controlnet_cond=conditions, apply_control=False)
        assert not torch.equal(unmatched.sample, base)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "guidance_scale, scale, window", [(1.0, 1.0, (0.0, 1.0)), (4.0, 0.7, (0.25, 0.75))]
)
def test_same_images_as_the_diffusers_controlnet_xs_pipeline(parts, guidance_scale, scale, window):
    pipe, adapter, conditions, latents = parts
    controlled = ControlNetXSUNet(pipe.unet, adapter)
    reference = StableDiffusionControlNetXSPipeline(
        **{k: v for k, v in pipe.components.items() if k not in ("image_encoder", "unet")},
        unet=controlled.fused,  # (given the base, it would fuse it with diffusers' epsilons)
        controlnet=adapter,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS,
        image=conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=scale,
        control_guidance_start=window[0],
        control_guidance_end=window[1],
        latents=latents.clone(),
        output_type="pt",
        height=RES,
        width=RES,
    ).images
    got = sample(
        pipe,
        controlled,
        PROMPTS,
        conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        scales=scale,
        control_guidance_start=window[0],
        control_guidance_end=window[1],
        latents=latents.clone(),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5
    plain = sample(pipe, None, PROMPTS, num_inference_steps=4, latents=latents.clone())
    assert (got - plain).abs().max() > 1e-2  # the control half acts


@pytest.mark.parametrize(
    "call, message",
    [
        ({"scales": [1.0, 0.5]}, "scales: \\[1.0, 0.5\\] is not allowed for a ControlNet-XS"),
        ({"guess_mode": True}, "guess_mode: not allowed for a ControlNet-XS; expected False"),
    ],
)
def test_controlnet_only_sampling_settings_are_refused_for_controlnet_xs(parts, call, message):
    pipe, adapter, conditions, _ = parts
    with pytest.raises(ValueError, match=message):
        sample(pipe, ControlNetXSUNet(pipe.unet, adapter), PROMPTS, conditions, 2, **call)


def test_the_adapter_saves_and_loads_as_its_diffusers_class(parts, tmp_path):
    pipe, adapter, _, _ = parts
    adapter.save_pretrained(tmp_path / "controlnet_xs", safe_serialization=True)
    loaded = ControlNetXSAdapter.from_pretrained(tmp_path / "controlnet_xs")
    ours, theirs = adapter.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
