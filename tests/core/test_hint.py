"""Eq. 9: the condition encoder E, released (3x3 convs, SiLU) and the paper's (4x4, ReLU)."""

import pytest
import torch
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from cnet import PaperHintEncoder, ReleasedHintEncoder, make_hint_encoder
from cnet.hint import downscale_factor_for, released_channels_for


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_released_encoder_is_diffusers_module_and_sd_size():
    with torch.device("meta"):
        ours = ReleasedHintEncoder(out_channels=320)
        theirs = ControlNetConditioningEmbedding(conditioning_embedding_channels=320)
    assert isinstance(ours, ControlNetConditioningEmbedding)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    # cldm/cldm.py's input_hint_block: 8 convs, 3x3, three of them stride 2, 16..256 -> 320
    assert len(convs) == 8
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 96, 96, 256, 320]
    assert _count(ours) == 1_086_480  # the "1.09M" condition encoder of SD1.5's ControlNet
    assert ours.downscale_factor == 8


def test_paper_encoder_layout_for_sd():
    with torch.device("meta"):
        enc = PaperHintEncoder(out_channels=320)
    convs = [m for m in enc.convs if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4)] * 4
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1]  # 8x: three halvings, one kept size
    assert sum(isinstance(m, nn.ReLU) for m in enc.convs) == 4
    assert enc.zero_conv.kernel_size == (1, 1) and enc.zero_conv.out_channels == 320
    assert _count(enc.convs) == 173_040 and _count(enc.zero_conv) == 41_280


@pytest.mark.parametrize("kind", ["released", "paper"])
@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_output_is_zero_at_init_and_downsampled_by_the_factor(kind, factor):
    torch.manual_seed(0)
    enc = make_hint_encoder(kind, out_channels=8, downscale_factor=factor)
    condition = torch.rand(2, 3, 16 * 3, 16 * 5)
    out = enc(condition)
    assert out.shape == (2, 8, 48 // factor, 80 // factor)
    assert torch.equal(out, torch.zeros_like(out))  # Eq. 3: E ends in a zero convolution


@pytest.mark.parametrize("kind", ["released", "paper"])
def test_output_moves_once_the_last_conv_leaves_zero(kind):
    torch.manual_seed(0)
    enc = make_hint_encoder(kind, out_channels=8)
    last = enc.conv_out if kind == "released" else enc.zero_conv
    with torch.no_grad():
        last.weight.normal_()
    out = enc(torch.rand(1, 3, 32, 32))
    assert out.abs().sum() > 0


def test_paper_encoder_is_gaussian_initialised_and_seeded():
    torch.manual_seed(3)
    a = PaperHintEncoder(out_channels=8)
    torch.manual_seed(3)
    b = PaperHintEncoder(out_channels=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    conv = [m for m in a.convs if isinstance(m, nn.Conv2d)][2]  # 32 -> 64, fan_in 32 * 16
    std = conv.weight.std().item()
    assert 0.8 < std / (2 / (32 * 16)) ** 0.5 < 1.2  # He-normal
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


def test_released_channels_follow_the_factor():
    assert released_channels_for(8) == (16, 32, 96, 256)
    assert released_channels_for(1) == (16,)
    assert released_channels_for(4) == (16, 32, 96)
    assert released_channels_for(32) == (16, 32, 96, 256, 256, 256)


def test_downscale_factor_from_sizes():
    assert downscale_factor_for(64, 512) == 8
    assert downscale_factor_for((8, 16), (64, 128)) == 8
    assert downscale_factor_for(32, 32) == 1
    for latent, condition in [(64, 96 * 4), ((8, 16), (64, 64)), (8, 12), (8, 4)]:
        with pytest.raises(ValueError, match="power-of-two multiple|power of two"):
            downscale_factor_for(latent, condition)


def test_bad_settings_name_what_was_expected():
    with pytest.raises(ValueError, match="needs 4 stage channels"):
        make_hint_encoder("released", 8, downscale_factor=8, channels=(16, 32))
    with pytest.raises(ValueError, match="at most 16x"):
        make_hint_encoder("paper", 8, downscale_factor=32)
    with pytest.raises(ValueError, match="power of two"):
        make_hint_encoder("paper", 8, downscale_factor=6)
    with pytest.raises(ValueError, match="'released' or 'paper'"):
        make_hint_encoder("gaussian", 8)


# ------------------------------------------------------------------ explicit reference forwards
# The encoders' geometry (which layers stride, where the padding goes, where the activations
# sit) written out with torch.nn.functional alone, from the paper's and the released code's
# description rather than from the modules' own settings; only the weights are the modules'.


def _randomise_(module: nn.Module, seed: int) -> None:
    """Non-zero weights and biases everywhere, the zero convolution included, so that every
    layer (and every bias) shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _paper_reference(enc: PaperHintEncoder, condition: torch.Tensor, factor: int) -> torch.Tensor:
    """§3.2: 4x4 convolutions with ReLU; the first log2(factor) stride 2 with padding 1, the rest
    stride 1 after a zero pad of 1 before and 2 after (left, right, top, bottom = 1, 2, 1, 2);
    then the 1x1 zero convolution."""
    import torch.nn.functional as F

    convs = [m for m in enc.convs if isinstance(m, nn.Conv2d)]
    halvings = factor.bit_length() - 1
    x = condition
    for k, conv in enumerate(convs):
        if k < halvings:
            x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        else:
            x = F.conv2d(F.pad(x, (1, 2, 1, 2)), conv.weight, conv.bias, stride=1, padding=0)
        x = F.relu(x)
    return F.conv2d(x, enc.zero_conv.weight, enc.zero_conv.bias)


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_paper_encoder_equals_an_explicit_reference_forward(factor):
    enc = PaperHintEncoder(out_channels=6, channels=(4, 5, 6, 7), downscale_factor=factor).double()
    _randomise_(enc, seed=factor)
    assert torch.count_nonzero(enc.zero_conv.weight) == enc.zero_conv.weight.numel()
    g = torch.Generator().manual_seed(100 + factor)
    condition = torch.rand(2, 3, 16 * 3, 16 * 5, generator=g, dtype=torch.float64)  # not square
    with torch.no_grad():
        out = enc(condition)
        expected = _paper_reference(enc, condition, factor)
    assert out.shape == (2, 6, 48 // factor, 80 // factor)
    assert expected.abs().max() > 0  # the comparison is not between two zero tensors
    assert torch.equal(out, expected)


def _released_reference(enc: ReleasedHintEncoder, condition: torch.Tensor) -> torch.Tensor:
    """cldm/cldm.py's input_hint_block: 3x3 convolutions, padding 1, SiLU after each but the
    last; conv_in keeps the size, then per stage a size-keeping conv and a stride-2 conv; the
    last (zero) conv keeps the size."""
    import torch.nn.functional as F

    x = F.silu(F.conv2d(condition, enc.conv_in.weight, enc.conv_in.bias, stride=1, padding=1))
    for k, block in enumerate(enc.blocks):
        stride = 1 if k % 2 == 0 else 2
        x = F.silu(F.conv2d(x, block.weight, block.bias, stride=stride, padding=1))
    return F.conv2d(x, enc.conv_out.weight, enc.conv_out.bias, stride=1, padding=1)


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_released_encoder_equals_an_explicit_reference_forward(factor):
    enc = make_hint_encoder(
        "released",
        out_channels=6,
        downscale_factor=factor,
        channels=(4, 5, 6, 7)[: factor.bit_length()],
    ).double()
    assert len(enc.blocks) == 2 * (factor.bit_length() - 1)
    _randomise_(enc, seed=factor)
    assert enc.zero_conv is enc.conv_out
    assert torch.count_nonzero(enc.conv_out.weight) == enc.conv_out.weight.numel()
    g = torch.Generator().manual_seed(200 + factor)
    condition = torch.rand(2, 3, 16 * 3, 16 * 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = enc(condition)
        expected = _released_reference(enc, condition)
    assert out.shape == (2, 6, 48 // factor, 80 // factor)
    assert expected.abs().max() > 0
    assert torch.equal(out, expected)
