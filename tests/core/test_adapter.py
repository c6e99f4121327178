"""cnet.adapter: diffusers' T2I-Adapter sized for a U-Net, on the locked U-Net; cnet.sample
samples it as diffusers' StableDiffusionAdapterPipeline does (same images, same seeds)."""

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import StableDiffusionAdapterPipeline

from cnet import AdaptedUNet, t2i_adapter_for
from cnet.sample import sample
from cnet.world.data import DEFAULT_RESOLUTION as RES

PROMPTS = ["red circle with blue background", "green circle with white background"]


@pytest.fixture(scope="module")
def parts():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(3)
    adapter = t2i_adapter_for(pipe.unet, RES)
    conditions = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return pipe, adapter, conditions, latents


def test_the_adapter_gives_one_map_per_down_block_at_its_resolution_and_channels(parts):
    pipe, adapter, conditions, _ = parts
    features = AdaptedUNet(pipe.unet, adapter).features(conditions)
    size = pipe.unet.config.sample_size
    assert [tuple(f.shape) for f in features] == [
        (2, channels, size >> level, size >> level)
        for level, channels in enumerate(pipe.unet.config.block_out_channels)
    ]
    halved = AdaptedUNet(pipe.unet, adapter).features(conditions, 0.5)
    assert all(torch.equal(h, f * 0.5) for h, f in zip(halved, features, strict=True))


def test_an_adapter_of_the_wrong_size_is_refused(parts):
    pipe = parts[0]
    with pytest.raises(ValueError, match="image_size: 60 is not allowed; expected a multiple"):
        t2i_adapter_for(pipe.unet, 60)
    short = t2i_adapter_for(pipe.unet, RES)
    short.adapter.body = short.adapter.body[:3]
    with pytest.raises(ValueError, match="the adapter gives 3 feature maps; this U-Net has 4"):
        AdaptedUNet(pipe.unet, short)


@pytest.mark.filterwarnings("ignore:The decode_latents method is deprecated:FutureWarning")
@pytest.mark.parametrize("guidance_scale, scale", [(1.0, 1.0), (4.0, 0.7)])
def test_same_images_as_the_diffusers_adapter_pipeline(parts, guidance_scale, scale):
    pipe, adapter, conditions, latents = parts
    reference = StableDiffusionAdapterPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"},
        adapter=adapter,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS,
        image=conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        adapter_conditioning_scale=scale,
        latents=latents.clone(),
        output_type="pt",
        height=RES,
        width=RES,
    ).images
    # this pipeline still decodes with its deprecated decode_latents: (N, H, W, 3) in [0, 1]
    expected = torch.from_numpy(expected).permute(0, 3, 1, 2)
    adapted = AdaptedUNet(pipe.unet, adapter)
    got = sample(
        pipe,
        adapted,
        PROMPTS,
        conditions,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        scales=scale,
        latents=latents.clone(),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5
    plain = sample(pipe, None, PROMPTS, num_inference_steps=4, latents=latents.clone())
    assert not torch.equal(got, plain)  # nothing of an adapter starts at zero


@pytest.mark.filterwarnings("ignore:The decode_latents method is deprecated:FutureWarning")
def test_two_adapters_compose_as_the_diffusers_multi_adapter_pipeline(parts):
    """Several adapters: their weighted features summed (diffusers' MultiAdapter), the same
    images as its pipeline given both adapters, both conditions and both weights."""
    pipe, adapter, conditions, latents = parts
    torch.manual_seed(4)
    second = t2i_adapter_for(pipe.unet, RES)
    other = conditions.flip(-1)
    reference = StableDiffusionAdapterPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"},
        adapter=[adapter, second],
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=4, guidance_scale=4.0, height=RES, width=RES)
    expected = reference(
        PROMPTS,
        image=[conditions, other],
        adapter_conditioning_scale=[0.7, 0.4],
        latents=latents.clone(),
        output_type="pt",
        **call,
    ).images
    expected = torch.from_numpy(expected).permute(0, 3, 1, 2)
    both = AdaptedUNet(pipe.unet, [adapter, second])
    got = sample(
        pipe,
        both,
        PROMPTS,
        [conditions, other],
        num_inference_steps=4,
        guidance_scale=4.0,
        scales=[0.7, 0.4],
        latents=latents.clone(),
    )
    assert (got * 0.5 + 0.5 - expected).abs().max() <= 1e-5
    summed = [a * 0.7 + b * 0.4 for a, b in zip(adapter(conditions), second(other), strict=True)]
    assert all(
        torch.equal(f, s)
        for f, s in zip(both.features([conditions, other], [0.7, 0.4]), summed, strict=True)
    )
    with pytest.raises(
        ValueError, match="expected one number \\(its weight\\), or one per adapter \\(2\\)"
    ):
        sample(pipe, both, PROMPTS, [conditions, other], 2, scales=[0.7])


def test_the_adapted_unet_adds_the_features_inside_the_down_blocks(parts):
    """Its call equals the U-Net given the features itself, and differs from the base's."""
    pipe, adapter, conditions, latents = parts
    text = torch.randn(2, 16, pipe.unet.config.cross_attention_dim)
    adapted = AdaptedUNet(pipe.unet, adapter)
    with torch.no_grad():
        got = adapted(latents, 500, text, conditions, 0.5)
        features = [f * 0.5 for f in adapter(conditions)]
        expected = pipe.unet(
            latents, 500, text, down_intrablock_additional_residuals=features
        ).sample
        base = pipe.unet(latents, 500, text).sample
    assert torch.equal(got, expected)
    assert not torch.equal(got, base)
    assert not any(p.requires_grad for p in adapted.unet.parameters())


@pytest.mark.parametrize(
    "call, message",
    [
        ({"scales": [1.0, 0.5]}, "scales: \\[1.0, 0.5\\] is not allowed for a T2I-Adapter"),
        ({"guess_mode": True}, "guess_mode, control_guidance_start, control_guidance_end"),
        ({"control_guidance_end": 0.5}, "not allowed for a T2I-Adapter; expected False, 0 and 1"),
    ],
)
def test_controlnet_only_sampling_settings_are_refused_for_an_adapter(parts, call, message):
    pipe, adapter, conditions, latents = parts
    with pytest.raises(ValueError, match=message):
        sample(pipe, AdaptedUNet(pipe.unet, adapter), PROMPTS, conditions, 2, **call)
