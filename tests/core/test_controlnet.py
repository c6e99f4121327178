"""§3.2: a ControlNet over a whole diffusers U-Net, checked against diffusers' ControlNetModel."""

import copy

import pytest
import torch
from _tiny_unets import (
    SD2_TINY,
    SD15_FULL_SIZE,
    SD15_TINY,
    inputs,
    max_abs_diff,
    paired_controlnets,
    randomize_,
    tiny_unet,
    unet_config,
)
from diffusers import UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnet import (
    ControlledUNet,
    ControlNet,
    ControlResiduals,
    cfg_resolution_weights,
    control_scales,
    guess_mode_scales,
    inject_residuals,
    to_diffusers,
    unet_skip_channels,
)
from cnet.course.injection_points import injection_points

TOL = 1e-6  # float32, same weights

CONFIGS = {"sd15": SD15_TINY, "sd2": SD2_TINY}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def unet(request):
    return tiny_unet(CONFIGS[request.param])


# ---- the trainable copy and the 12 + 1 zero convs ------------------------------------------


def test_trainable_copy_is_bitwise_and_independent(unet):
    net = ControlNet.from_unet(unet)
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(net, part).state_dict(), getattr(unet, part).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{part}.{key}"
            assert ours[key].data_ptr() != theirs[key].data_ptr(), f"{part}.{key} shares storage"
    assert all(p.requires_grad for p in net.parameters())
    assert net.n_residuals == 13 and len(net.zero_convs) == 12
    channels = [8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32]
    assert list(net.skip_channels) == unet_skip_channels(unet) == channels
    for z in [*net.zero_convs, net.mid_zero_conv]:
        assert z.kernel_size == (1, 1)
        assert not z.weight.any() and not z.bias.any()


@pytest.mark.parametrize(
    "levels, layers, attention",
    [(2, 1, (True, False)), (3, 2, (False, True, False)), (4, 3, (True,) * 3 + (False,))],
)
def test_residual_count_follows_the_config(levels, layers, attention):
    unet = tiny_unet(unet_config(levels, layers, 8, attention))
    net = ControlNet.from_unet(unet)
    # after conv_in, after each layer of each level, after each downsampler, + the middle
    assert net.n_residuals == 1 + levels * layers + (levels - 1) + 1
    x, t, text, c = inputs(unet, 2, 8, 8)
    residuals = net(x, t, text, c)
    assert len(residuals) == net.n_residuals
    assert [r.shape[1] for r in residuals.down] == unet_skip_channels(unet)


def test_sd15_residual_channels_and_sizes_on_meta():
    sd15 = SD15_FULL_SIZE
    with torch.device("meta"):
        points = injection_points(UNet2DConditionModel(**sd15))
    assert [p.channels for p in points] == [320] * 4 + [640] * 3 + [1280] * 6
    assert [p.height for p in points] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4
    assert points[0].decoder == "up_blocks.3.resnets.2 (skip)"
    assert points[-1].official == "middle_block_out"


def test_injection_points_match_the_residual_shapes(unet):
    net = ControlNet.from_unet(unet)
    x, t, text, c = inputs(unet, 1, 8, 16)
    shapes = [tuple(r.shape[1:]) for r in net(x, t, text, c).tensors()]
    points = injection_points(unet, (8, 16))
    assert [(p.channels, p.height, p.width) for p in points] == shapes
    assert [p.encoder for p in points] == net.residual_names()


# ---- equality with diffusers ----------------------------------------------------------------


def _compare_with_diffusers(unet, batch, h, w, scale, guess_mode, seed=0):
    ours, reference = paired_controlnets(unet, seed=seed + 1)
    x, t, text, c = inputs(unet, batch, h, w, seed=seed + 2)
    with torch.no_grad():
        down, mid = reference(
            x, t, text, c, conditioning_scale=scale, guess_mode=guess_mode, return_dict=False
        )
        got = ours.residuals(x, t, text, c, scale, guess_mode, guess_rule="diffusers")
        residual_err = max_abs_diff(got.tensors(), [*down, mid])
        y_ref = unet(
            x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        y = ControlledUNet(unet, ours)(
            x, t, text, c, scales=scale, guess_mode=guess_mode, guess_rule="diffusers"
        )
    assert mid.abs().max() > 0  # a real comparison: the residuals are not zero
    return residual_err, (y - y_ref).abs().max().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scale, guess_mode", [(1.0, False), (0.6, True)])
def test_residuals_and_output_equal_diffusers(name, scale, guess_mode):
    unet = tiny_unet(CONFIGS[name])
    residual_err, output_err = _compare_with_diffusers(unet, 3, 8, 16, scale, guess_mode)
    assert residual_err <= TOL and output_err <= TOL


@pytest.mark.slow
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    levels=st.integers(2, 4),
    layers=st.integers(1, 2),
    base=st.sampled_from([8, 16]),
    linear=st.booleans(),
    heads=st.lists(st.sampled_from([1, 2, 4]), min_size=4, max_size=4),
    batch=st.integers(1, 3),
    hw=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 3])),
    scale=st.floats(0.1, 2.0),
    guess_mode=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_tiny_configs_equal_diffusers(
    levels, layers, base, linear, heads, batch, hw, scale, guess_mode, seed
):
    attention = (True,) * (levels - 1) + (False,)
    config = unet_config(
        levels,
        layers,
        base,
        attention,
        use_linear_projection=linear,
        attention_head_dim=tuple(heads[:levels]),  # head counts per level, as SD2 has
    )
    unet = tiny_unet(config, seed=seed)
    size = 2 ** (levels - 1)  # latents the U-Net can halve down to its last level
    residual_err, output_err = _compare_with_diffusers(
        unet, batch, size * hw[0], size * hw[1], scale, guess_mode, seed=seed
    )
    assert residual_err <= TOL and output_err <= TOL


# ---- Eq. 4 for the whole U-Net ---------------------------------------------------------------


@pytest.mark.parametrize("hint", ["released", "paper"])
def test_controlled_unet_equals_plain_unet_bitwise_at_init(unet, hint):
    torch.manual_seed(0)
    nets = [ControlNet.from_unet(unet, hint), ControlNet.from_unet(unet, hint)]
    x, t, text, c = inputs(unet, 2, 8, 16)
    controlled = ControlledUNet(unet, nets)  # locks the U-Net
    with torch.no_grad():
        # y from the same locked U-Net: torch's linear layers may take another (equally valid)
        # kernel when requires_grad changes, which is not what Eq. 4 is about.
        y = unet(x, t, text).sample
        for kwargs in [{}, {"guess_mode": True, "scales": [0.5, 2.0]}, {"only_mid_control": True}]:
            y_c = controlled(x, t, text, [c, c], **kwargs)
            assert torch.equal(y_c, y), kwargs  # y_c == y, Eq. 4


def test_first_step_gradients_reach_only_the_13_output_zero_convs(unet):
    net = ControlNet.from_unet(unet)
    controlled = ControlledUNet(unet, net)
    x, t, text, c = inputs(unet, 2, 8, 8)
    loss = controlled(x, t, text, c).square().mean()
    loss.backward()
    output_convs = {id(p) for z in [*net.zero_convs, net.mid_zero_conv] for p in z.parameters()}
    for name, p in net.named_parameters():
        moved = p.grad is not None and bool(p.grad.any())
        assert moved == (id(p) in output_convs), name
    assert all(p.grad is None for p in unet.parameters())  # locked


# ---- scales, guess mode, pooling, composition -----------------------------------------------


def test_guess_mode_scales_released_and_diffusers():
    released = guess_mode_scales(13, "released")
    diffusers = guess_mode_scales(13, "diffusers")
    assert released == tuple(0.825 ** (12 - i) for i in range(13))
    assert torch.allclose(torch.tensor(diffusers), torch.logspace(-1, 0, 13))
    assert released[-1] == diffusers[-1] == 1.0
    assert abs(diffusers[0] - 0.1) < 1e-7 and abs(released[0] - 0.0994) < 1e-4
    ratio = [d / r for d, r in zip(diffusers, released)]
    assert max(ratio) < 1.006 and min(ratio) >= 1.0  # 10^(-1/12) = 0.82540 vs 0.825


def test_cfg_resolution_weights_are_64_over_h_on_sd15_and_scale_the_residuals(unet):
    """ICCV §3.4: w_i = 64 / h_i, h_i the height of residual i (64, 32, 16, 8 on SD1.5)."""
    with torch.device("meta"):
        heights = [p.height for p in injection_points(UNet2DConditionModel(**SD15_FULL_SIZE))]
    assert cfg_resolution_weights(heights) == tuple(64 / h for h in heights)
    assert cfg_resolution_weights(heights) == (1,) * 3 + (2,) * 3 + (4,) * 3 + (8,) * 4
    with pytest.raises(ValueError, match="needs the 13 residuals' heights"):
        guess_mode_scales(13, "cfg_rw")
    net, _ = paired_controlnets(unet)
    x, t, text, c = inputs(unet, 1, 8, 8)
    with torch.no_grad():
        raw = net(x, t, text, c)
        weighted = net.residuals(x, t, text, c, guess_mode=True, guess_rule="cfg_rw")
    tiny_heights = [r.shape[-2] for r in raw.tensors()]
    assert len(set(tiny_heights)) > 1  # several resolutions, so the weights differ
    for r, w, h in zip(raw.tensors(), weighted.tensors(), tiny_heights, strict=True):
        assert torch.equal(w, r * (tiny_heights[0] / h))


def test_control_scales_combine_and_check_length():
    assert control_scales(3, 0.5) == (0.5, 0.5, 0.5)
    assert control_scales(3) == (1.0, 1.0, 1.0)  # no scale given: the residuals as they are
    assert control_scales(3, [1.0, 2.0, 3.0], guess_mode=True) == (0.825**2, 2 * 0.825, 3.0)
    with pytest.raises(ValueError, match=r"one control scale or 13 \(one per residual: 12 skip "):
        control_scales(13, [1.0] * 12)


def test_guess_modes_diffusers_ramp_is_multiplied_in_float32_as_diffusers_does():
    # ControlNetModel.forward multiplies its float32 logspace by the float scale in float32; in
    # float64 some of the 13 products round to another float32
    ramp = torch.logspace(-1, 0, 13)
    float32 = tuple((ramp * 0.7).tolist())
    assert control_scales(13, 0.7, guess_mode=True, guess_rule="diffusers") == float32
    in_float64 = torch.tensor([0.7 * g for g in ramp.tolist()], dtype=torch.float64)
    assert float32 != tuple(in_float64.float().tolist())  # 4 of the 13 round otherwise


def test_guess_mode_scales_length_ends_and_heights():
    assert len(guess_mode_scales()) == 13  # SD's 12 skips + 1 middle block by default
    assert guess_mode_scales(1) == (1.0,)  # one residual: the middle block alone, at 1
    assert guess_mode_scales(2) == (0.825, 1.0)
    # the weights divide the *first* residual's height, whatever the heights
    assert cfg_resolution_weights([8, 4, 2]) == (1.0, 2.0, 4.0)
    assert guess_mode_scales(3, "cfg_rw", heights=[8, 4, 2]) == (1.0, 2.0, 4.0)


def test_bad_scales_and_heights_are_refused_in_one_line_naming_the_value():
    with pytest.raises(ValueError, match=r"^expected n_residuals >= 1, got 0$"):
        guess_mode_scales(0)
    with pytest.raises(ValueError, match=r"guess_rule: .*'cfg_rw', got 'linear'$"):
        guess_mode_scales(13, "linear")
    with pytest.raises(ValueError, match=r"heights >= 1, got \[8, 0\]$"):
        cfg_resolution_weights([8, 0])  # one height of zero is refused, not only all of them
    with pytest.raises(ValueError, match=r"got \[\]$"):
        cfg_resolution_weights([])
    residuals = ControlResiduals.from_tensors([torch.ones(1, 1, 2, 2)] * 3)
    with pytest.raises(ValueError, match=r"^expected 3 scales \(one per residual\), got 2$"):
        residuals.scaled([1.0, 1.0])
    with pytest.raises(ValueError, match=r"^cannot add 2 residuals to 3$"):
        residuals + ControlResiduals.from_tensors([torch.ones(1, 1, 2, 2)] * 2)


def test_per_residual_scales_and_only_mid_control(unet):
    net, _ = paired_controlnets(unet)
    x, t, text, c = inputs(unet, 2, 8, 8)
    scales = [0.1 * (i + 1) for i in range(13)]
    controlled = ControlledUNet(unet, net)
    with torch.no_grad():
        raw = net(x, t, text, c)
        manual = ControlResiduals.from_tensors([r * s for r, s in zip(raw.tensors(), scales)])
        y = controlled(x, t, text, c, scales=scales)
        assert torch.equal(y, inject_residuals(unet, x, t, text, manual))
        y_mid = controlled(x, t, text, c, scales=scales, only_mid_control=True)
        y_mid_ref = unet(
            x,
            t,
            text,
            down_block_additional_residuals=[torch.zeros_like(r) for r in manual.down],
            mid_block_additional_residual=manual.mid,
        ).sample
        assert torch.equal(y_mid, y_mid_ref)
        assert not torch.equal(y_mid, y) and not torch.equal(y_mid, unet(x, t, text).sample)
    with pytest.raises(ValueError, match="13 \\(one per residual"):
        controlled(x, t, text, c, scales=[1.0] * 12)


def test_global_pool_matches_diffusers_shuffle(unet):
    net, reference = paired_controlnets(unet)
    net.global_pool = True
    reference.register_to_config(global_pool_conditions=True)
    x, t, text, c = inputs(unet, 2, 8, 16)
    with torch.no_grad():
        pooled = net.residuals(x, t, text, c, scale=0.7)
        down, mid = reference(x, t, text, c, conditioning_scale=0.7, return_dict=False)
        # diffusers skips the guess-mode ramp when pooling; the released code applies both
        down_g, mid_g = reference(x, t, text, c, 0.7, guess_mode=True, return_dict=False)
        released = net.residuals(x, t, text, c, scale=0.7, guess_mode=True)
    assert all(r.shape[2:] == (1, 1) for r in pooled.tensors())
    assert max_abs_diff(pooled.tensors(), [*down, mid]) <= TOL
    # so diffusers' pooled guess mode is cnet's pooled output without the ramp
    assert max_abs_diff(pooled.tensors(), [*down_g, mid_g]) <= TOL
    # cnet pools *and* ramps, as the released code does: residual i is the pooled residual
    # times the guess-mode scale of residual i (0.825^12 ~ 0.1 for the first, 1 for the middle)
    ramp = guess_mode_scales(13)
    assert ramp[0] < 0.1 and ramp[-1] == 1.0
    assert all(r.shape[2:] == (1, 1) for r in released.tensors())
    for i, (r, p) in enumerate(zip(released.tensors(), pooled.tensors(), strict=True)):
        assert p.abs().max() > 0, i
        torch.testing.assert_close(r, p * ramp[i], rtol=1e-5, atol=1e-6, msg=f"residual {i}")
    assert released.down[0].abs().max() < pooled.down[0].abs().max()


def test_several_controlnets_add_and_match_diffusers_multicontrolnet(unet):
    (a, ref_a), (b, ref_b) = paired_controlnets(unet, seed=1), paired_controlnets(unet, seed=7)
    x, t, text, c1 = inputs(unet, 2, 8, 8, seed=3)
    c2 = torch.rand_like(c1)
    controlled = ControlledUNet(unet, [a, b])
    with torch.no_grad():
        summed = controlled.residuals(x, t, text, [c1, c2], scales=[0.5, 1.5])
        expected = a(x, t, text, c1).scaled([0.5] * 13) + b(x, t, text, c2).scaled([1.5] * 13)
        assert max_abs_diff(summed.tensors(), expected.tensors()) == 0.0
        down, mid = MultiControlNetModel([ref_a, ref_b])(
            x, t, text, [c1, c2], [0.5, 1.5], return_dict=False
        )
        assert max_abs_diff(summed.tensors(), [*down, mid]) <= TOL
        y = controlled(x, t, text, [c1, c2], scales=[0.5, 1.5])
        y_ref = unet(
            x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        assert (y - y_ref).abs().max() <= TOL
    with pytest.raises(ValueError, match="one per ControlNet \\(2\\)"):
        controlled(x, t, text, [c1])
    with pytest.raises(ValueError, match="one entry per ControlNet \\(2\\)"):
        controlled(x, t, text, [c1, c2], scales=[1.0, 1.0, 1.0])


def test_control_mask_leaves_the_unconditional_half_alone(unet):
    net, _ = paired_controlnets(unet)
    x, t, text, c = inputs(unet, 4, 8, 8)
    mask = torch.tensor([False, False, True, True])
    controlled = ControlledUNet(unet, net)
    with torch.no_grad():
        y = controlled(x, t, text, c, guess_mode=True, control_mask=mask)
        plain = unet(x, t, text).sample
        alone = controlled(x[2:], t[2:], text[2:], c[2:], guess_mode=True)
    assert torch.equal(y[:2], plain[:2])
    assert (y[2:] - alone).abs().max() <= TOL
    assert not torch.allclose(y[2:], plain[2:])


# ---- other encoders and sizes ---------------------------------------------------------------


def test_paper_hint_encoder_and_condition_size(unet):
    net = ControlNet.from_unet(unet, "paper", condition_size=32)  # 8x8 latents -> 4x
    assert net.downscale_factor == 4
    x, t, text, _ = inputs(unet, 2, 8, 8)
    randomize_(net, seed=0)
    residuals = net(x, t, text, torch.rand(2, 3, 32, 32))
    assert residuals.mid.abs().max() > 0
    with pytest.raises(ValueError, match="released condition encoder only"):
        to_diffusers(net)
    with pytest.raises(ValueError, match="power-of-two multiple"):
        ControlNet.from_unet(unet, condition_size=60)


# ---- clear errors ----------------------------------------------------------------------------


def test_bad_inputs_name_the_expected_shape(unet):
    net = ControlNet.from_unet(unet)
    x, t, text, c = inputs(unet, 2, 8, 16)
    with pytest.raises(ValueError, match=r"condition: expected shape \(2, 3, 64, 128\)"):
        net(x, t, text, c[:, :1])
    with pytest.raises(ValueError, match=r"condition: expected shape \(2, 3, 64, 128\)"):
        net(x, t, text, c[..., :64, :64])
    with pytest.raises(ValueError, match=r"sample: expected shape \(N, 4, h, w\)"):
        net(x[:, :3], t, text, c)
    dim = unet.config.cross_attention_dim
    with pytest.raises(ValueError, match=rf"encoder_hidden_states: expected shape \(2, L, {dim}\)"):
        net(x, t, text[..., :3], c)
    with pytest.raises(ValueError, match=r"timestep: expected .* \(2,\)"):
        net(x, torch.tensor([1, 2, 3]), text, c)
    controlled = ControlledUNet(unet, net)
    with pytest.raises(ValueError, match="control_mask: expected a bool tensor of shape"):
        controlled(x, t, text, c, control_mask=torch.tensor([1, 0]))
    residuals = net(x, t, text, c)
    short = ControlResiduals(down=residuals.down[:-1], mid=residuals.mid)
    with pytest.raises(ValueError, match="expected 12 skip residuals with channels"):
        inject_residuals(unet, x, t, text, short)


def test_a_condition_encoded_once_gives_the_same_residuals_bit_for_bit(unet):
    net, other = ControlNet.from_unet(unet), ControlNet.from_unet(unet)
    randomize_(net, 0)  # a trained encoder: its zero conv is no longer 0
    x, t, text, c = inputs(unet, 2, 8, 16)
    encoded = net.encode_condition(c)
    assert net.encode_condition(encoded) is encoded
    assert encoded.features.abs().sum() > 0
    for timestep in (t, t + 100):  # one encoding serves every sampling step
        fresh, reused = net(x, timestep, text, c), net(x, timestep, text, encoded)
        assert all(torch.equal(a, b) for a, b in zip(fresh.tensors(), reused.tensors()))
    mask = torch.tensor([False, True])
    controlled = ControlledUNet(unet, net)
    # guess mode's mask picks rows of the encoded batch (the encoder saw both rows: float error)
    assert (
        max_abs_diff(
            controlled(x, t, text, encoded, control_mask=mask),
            controlled(x, t, text, c, control_mask=mask),
        )
        < TOL
    )
    with pytest.raises(ValueError, match="condition: encoded by another ControlNet's"):
        other(x, t, text, encoded)
    with pytest.raises(ValueError, match=r"condition: expected shape \(1, .*, 8, 16\), encoded"):
        net(x[:1], t, text[:1], encoded)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep' \\(expected None\\)"),
        ({"time_cond_proj_dim": 4}, "time_cond_proj_dim=4"),
        ({"mid_block_type": None}, "mid_block_type=None"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ],
)
def test_unet_configs_cnet_cannot_mirror_are_refused(change, message):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(SD15_TINY, **change))
    with pytest.raises(
        ValueError, match="cnet cannot mirror this UNet2DConditionModel: " + message
    ):
        ControlNet.from_unet(unet)


def test_controlnet_of_another_unet_is_refused(unet):
    other = tiny_unet(unet_config(2, 1, 8, (True, False)))
    with pytest.raises(ValueError, match="this U-Net's skip connections expect"):
        ControlledUNet(unet, ControlNet.from_unet(other))


def test_transfer_rule_adds_the_fine_tunes_change_to_the_copy_only(unet):
    """tool_transfer_control.py's rule: Θc' = Θc + (Θfine-tune − Θbase) for every weight copied
    from the U-Net; condition encoder and zero convolutions as they were; the original untouched."""
    net = ControlNet.from_unet(unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    unmoved = net.transferred(unet, unet).state_dict()  # a fine-tune that changed nothing
    assert all(torch.equal(v, before[k]) for k, v in unmoved.items())
    tuned = copy.deepcopy(unet)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    moved = net.transferred(unet, tuned).state_dict()
    base_weights, tuned_weights = unet.state_dict(), tuned.state_dict()
    copied = [k for k in moved if k.startswith(("conv_in", "time_", "down_blocks", "mid_block"))]
    assert len(copied) == len(base_weights) - sum(  # every U-Net weight but the decoder side
        k.startswith(("up_blocks", "conv_norm_out", "conv_out")) for k in base_weights
    )
    for name, weight in moved.items():
        expected = (
            before[name] + (tuned_weights[name] - base_weights[name])
            if name in copied
            else before[name]
        )
        assert torch.equal(weight, expected), name
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    other = tiny_unet(unet_config(2, 1, 8, (True, False)))
    with pytest.raises(ValueError, match="fine_tune: not the U-Net this ControlNet was copied"):
        net.transferred(unet, other)
    with pytest.raises(ValueError, match="base: not the U-Net this ControlNet was copied"):
        net.transferred(other, unet)


def test_cfg_resolution_weighting_reads_each_residual_height_not_its_width():
    # a 12 x 16 latent: the heights halve 12 -> 6 -> 3 -> 2 (rounded up), the widths
    # 16 -> 8 -> 4 -> 2, so h_0 / h_i and w_0 / w_i part at the deepest level
    unet = tiny_unet(SD15_TINY)
    ours, _ = paired_controlnets(unet)
    x, t, text, c = inputs(unet, 2, 12, 16)
    with torch.no_grad():
        raw = ours(x, t, text, c)
        got = ours.residuals(x, t, text, c, 1.0, guess_mode=True, guess_rule="cfg_rw")
    heights = [r.shape[-2] for r in raw.tensors()]
    assert heights == [12] * 3 + [6] * 3 + [3] * 3 + [2] * 4
    weights = [12 / h for h in heights]  # ICCV §3.4: h_0 / h_i, the largest map's weight 1
    assert weights[-1] == 6.0 and 16 / raw.tensors()[-1].shape[-1] == 8.0
    for r, w, g in zip(raw.tensors(), weights, got.tensors(), strict=True):
        assert torch.equal(g, r * w)
