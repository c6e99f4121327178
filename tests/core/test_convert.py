"""Weights across layouts: diffusers ControlNetModel <-> cnet <-> official lllyasviel keys."""

import json

import pytest
import torch
from _tiny_unets import (
    SD2_TINY,
    SD15_FULL_SIZE,
    SD15_TINY,
    inputs,
    max_abs_diff,
    paired_controlnets,
    tiny_unet,
)
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cnet import (
    ControlledUNet,
    ControlNet,
    from_diffusers,
    from_official,
    load_official_state_dict,
    read_official_weights,
    save_official,
    to_diffusers,
    to_official_state_dict,
)
from cnet.convert import official_key_map

CONFIGS = {"sd15": SD15_TINY, "sd2": SD2_TINY}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    """(unet, cnet ControlNet, diffusers ControlNetModel) with the same non-zero weights."""
    unet = tiny_unet(CONFIGS[request.param])
    ours, reference = paired_controlnets(unet, seed=11)
    return unet, ours, reference


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _residual_err(unet, net, reference) -> float:
    x, t, text, c = inputs(unet, 2, 8, 16, seed=5)
    with torch.no_grad():
        down, mid = reference(x, t, text, c, return_dict=False)
        return max_abs_diff(net(x, t, text, c).tensors(), [*down, mid])


# ---- diffusers ------------------------------------------------------------------------------


def test_diffusers_round_trip_is_key_for_key_and_bitwise(pair):
    unet, _, reference = pair
    net = from_diffusers(reference)
    assert _residual_err(unet, net, reference) == 0.0
    back = to_diffusers(net)
    assert _public(back.config) == _public(reference.config)
    ref_state, back_state = reference.state_dict(), back.state_dict()
    assert list(back_state) == list(ref_state)
    assert all(torch.equal(back_state[k], ref_state[k]) for k in ref_state)


def test_from_unet_exports_what_diffusers_from_unet_builds(pair):
    unet, _, _ = pair
    exported = to_diffusers(ControlNet.from_unet(unet))
    built = ControlNetModel.from_unet(unet)
    assert _public(exported.config) == _public(built.config)
    ours = exported.state_dict()
    assert ours.keys() == built.state_dict().keys()
    for key, value in built.state_dict().items():
        randomly_initialised = (
            key.startswith("controlnet_cond_embedding.") and "conv_out" not in key
        )
        if randomly_initialised:  # E's inner convs: fresh random weights on both sides
            assert ours[key].shape == value.shape, key
        else:  # the copy of the U-Net, and zeros
            assert torch.equal(ours[key], value), key


def test_saved_with_save_pretrained_runs_in_diffusers_pipeline(tmp_path):
    """The exported ControlNet, saved and reloaded as safetensors, in diffusers' pipeline with
    guess mode and classifier-free guidance, gives cnet's own sampling loop's latents."""
    unet = tiny_unet(SD15_TINY)
    net, _ = paired_controlnets(unet, seed=3)
    to_diffusers(net).save_pretrained(tmp_path / "controlnet")
    assert (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    controlnet = ControlNetModel.from_pretrained(tmp_path / "controlnet")

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "circle</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
    )
    pipe = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    condition = torch.rand(2, 3, 64, 64, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    negative = torch.randn(2, 5, 16, generator=g)
    guidance, scale = 4.0, 0.8
    with torch.no_grad():
        out = pipe(
            prompt_embeds=text,
            negative_prompt_embeds=negative,
            image=condition,
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=guidance,
            controlnet_conditioning_scale=scale,
            guess_mode=True,
            latents=latents.clone(),
            output_type="latent",
        ).images

        # cnet: guess mode on the conditional half only, as the released demos run it
        controlled = ControlledUNet(unet, net)
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(2)
        x = latents.clone()
        mask = torch.tensor([False, False, True, True])
        for t in scheduler.timesteps:
            eps = controlled(
                torch.cat([x, x]),
                t,
                torch.cat([negative, text]),
                torch.cat([condition, condition]),
                scales=scale,
                guess_mode=True,
                guess_rule="diffusers",
                control_mask=mask,
            )
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
    assert (out - x).abs().max() <= 1e-5


# ---- official checkpoints -------------------------------------------------------------------


def test_official_layout_is_what_diffusers_converter_reads(pair):
    """Independent check of the key mapping: diffusers' own ldm -> diffusers converter turns
    cnet's official export back into the ControlNetModel's state dict, key for key, bit for bit."""
    _, net, reference = pair
    official = to_official_state_dict(net)
    assert all(k.startswith("control_model.") for k in official)
    converted = convert_ldm_unet_checkpoint(
        dict(official),
        {"layers_per_block": 2, "class_embed_type": None, "addition_embed_type": None},
        controlnet=True,
    )
    expected = reference.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_official_state_dict_loads_and_exports_back_key_for_key(pair, tmp_path):
    unet, _, reference = pair
    official = to_official_state_dict(from_diffusers(reference))
    # a full ControlLDM checkpoint also holds SD itself; those keys are not the ControlNet's
    full = {**official, "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}
    for source in ("dict", ".pth", ".safetensors"):
        if source == "dict":
            checkpoint = full
        elif source == ".pth":
            checkpoint = tmp_path / "control.pth"
            torch.save({"state_dict": full}, checkpoint)
        else:
            checkpoint = save_official(from_diffusers(reference), tmp_path / "c.safetensors")
        net = from_official(unet, checkpoint)
        assert _residual_err(unet, net, reference) == 0.0, source
        back = to_official_state_dict(net)
        assert list(back) == list(official), source
        assert all(torch.equal(back[k], official[k]) for k in official), source


def test_sd15_official_keys_and_shapes_on_meta():
    sd15 = SD15_FULL_SIZE
    with torch.device("meta"):
        net = ControlNet.from_unet(UNet2DConditionModel(**sd15))
        official = to_official_state_dict(net)
    shapes = {k[len("control_model.") :]: tuple(v.shape) for k, v in official.items()}
    assert shapes["time_embed.0.weight"] == (1280, 320)
    assert shapes["input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes["input_blocks.4.0.in_layers.2.weight"] == (640, 320, 3, 3)
    assert shapes["input_blocks.11.0.out_layers.3.weight"] == (1280, 1280, 3, 3)
    assert shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    assert shapes["middle_block.2.emb_layers.1.weight"] == (1280, 1280)
    assert shapes["input_hint_block.0.weight"] == (16, 3, 3, 3)
    assert shapes["input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert shapes["zero_convs.11.0.weight"] == (1280, 1280, 1, 1)
    assert shapes["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    hint = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block."))
    assert sorted(set(hint)) == list(range(0, 16, 2))
    assert {k.split(".")[1] for k in shapes if k.startswith("zero_convs.")} == {
        str(i) for i in range(12)
    }


def test_bad_checkpoints_list_missing_unexpected_and_misshaped_keys(pair):
    unet, net, _ = pair
    official = to_official_state_dict(net)
    broken = dict(official)
    del broken["control_model.zero_convs.3.0.bias"]
    broken["control_model.zero_convs.12.0.weight"] = torch.zeros(1)
    broken["control_model.middle_block_out.0.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError) as info:
        load_official_state_dict(ControlNet.from_unet(unet), broken)
    message = str(info.value)
    assert "missing keys (1): control_model.zero_convs.3.0.bias" in message
    assert "unexpected keys (1): control_model.zero_convs.12.0.weight" in message
    assert "mis-shaped keys (1): control_model.middle_block_out.0.weight: expected" in message


def test_what_cannot_be_converted_is_refused(pair, tmp_path):
    unet, net, reference = pair
    paper = ControlNet.from_unet(unet, "paper")
    with pytest.raises(ValueError, match="released condition encoder only"):
        official_key_map(paper)
    with pytest.raises(ValueError, match="expected a .safetensors path"):
        save_official(net, tmp_path / "control.pth")
    bgr = ControlNetModel.from_config(
        dict(reference.config, controlnet_conditioning_channel_order="bgr")
    )
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order='bgr'"):
        from_diffusers(bgr)
    with pytest.raises(ValueError, match="expected a diffusers ControlNetModel"):
        from_diffusers(unet)
    odd = tiny_unet(dict(SD15_TINY, resnet_out_scale_factor=2.0))
    with pytest.raises(ValueError, match="resnet_out_scale_factor=2.0"):
        to_diffusers(ControlNet.from_unet(odd))


def test_read_official_weights_uses_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "code": print}, path)  # pickled callables are refused
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        read_official_weights(path)
    # and it asks for weights_only itself rather than relying on torch's default (which was
    # False before torch 2.6): every torch.load call must pass weights_only=True explicitly
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0), "b": torch.ones(2)}}, good)
    state = read_official_weights(good)
    assert calls and all(kw.get("weights_only") is True for kw in calls), calls
    assert set(state) == {"w", "b"} and torch.equal(state["w"], torch.arange(3.0))


def test_a_two_level_controlnet_model_round_trips_through_cnet():
    # the U-Net a ControlNetModel mirrors is rebuilt from its config for export, decoder included
    from _tiny_unets import unet_config

    unet = tiny_unet(unet_config(2, 1, 8, (True, False)))
    reference = ControlNetModel.from_unet(unet)
    back = to_diffusers(from_diffusers(reference))
    assert _public(back.config) == _public(reference.config)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in reference.state_dict().items())
