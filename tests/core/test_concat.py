"""cnet.concat: the whole U-Net with the condition's latent concatenated to its input; it keeps
the base bit for bit before any update, and cnet.sample samples it as diffusers'
StableDiffusionInstructPix2PixPipeline does with an image guidance of 1 (same images)."""

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

from cnet import ConcatenatedUNet, concat_unet_for
from cnet.sample import sample
from cnet.world.data import DEFAULT_RESOLUTION as RES

PROMPTS = ["red circle with blue background", "green circle with white background"]


@pytest.fixture(scope="module")
def parts():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    unet = concat_unet_for(pipe.unet)
    with torch.no_grad():  # as if trained: the condition's channels act
        unet.conv_in.weight[:, 4:].normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
    conditions = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return pipe, unet, conditions, latents


def test_before_any_update_it_predicts_what_the_base_does_bit_for_bit(parts):
    pipe, _, conditions, latents = parts
    fresh = concat_unet_for(pipe.unet)
    assert fresh.config.in_channels == 2 * pipe.unet.config.in_channels
    assert not fresh.conv_in.weight[:, 4:].any()
    assert all(p.requires_grad for p in fresh.parameters())
    text = torch.randn(2, 16, pipe.unet.config.cross_attention_dim)
    concatenated = ConcatenatedUNet(fresh, pipe.vae)
    with torch.no_grad():
        assert torch.equal(
            concatenated(latents, 500, text, conditions), pipe.unet(latents, 500, text).sample
        )
    assert not any(p.requires_grad for p in concatenated.vae.parameters())


def test_the_condition_latent_is_the_vaes_mode_unscaled(parts):
    pipe, unet, conditions, _ = parts
    expected = pipe.vae.encode(conditions * 2 - 1).latent_dist.mode()
    got = ConcatenatedUNet(unet, pipe.vae).condition_latents(conditions)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_same_images_as_the_diffusers_instruct_pix2pix_pipeline(parts, guidance_scale):
    pipe, unet, conditions, latents = parts
    reference = StableDiffusionInstructPix2PixPipeline(
        **{k: v for k, v in pipe.components.items() if k not in ("image_encoder", "unet")},
        unet=unet,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS,
        image=conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        image_guidance_scale=1.0,
        latents=latents.clone(),
        output_type="pt",
    ).images
    got = sample(
        pipe,
        ConcatenatedUNet(unet, pipe.vae),
        PROMPTS,
        conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        latents=latents.clone(),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5
    plain = sample(pipe, None, PROMPTS, num_inference_steps=4, latents=latents.clone())
    assert (got - plain).abs().max() > 1e-2


@pytest.mark.parametrize(
    "call, message",
    [
        ({"scales": 0.5}, "scales: 0.5 is not allowed for a channel-concatenation U-Net; "),
        ({"guess_mode": True}, "guess_mode, control_guidance_start, control_guidance_end"),
        ({"control_guidance_start": 0.5}, "expected False, 0 and 1"),
    ],
)
def test_controlnet_only_sampling_settings_are_refused_for_concatenation(parts, call, message):
    pipe, unet, conditions, _ = parts
    with pytest.raises(ValueError, match=message):
        sample(pipe, ConcatenatedUNet(unet, pipe.vae), PROMPTS, conditions, 2, **call)


def test_the_unet_saves_and_loads_as_its_diffusers_class(parts, tmp_path):
    unet = parts[1]
    unet.save_pretrained(tmp_path / "concat_unet", safe_serialization=True)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "concat_unet")
    assert loaded.config.in_channels == 8
    ours, theirs = unet.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
