"""Eq. 1–4: lock, trainable copy, and the controlled block y_c = F(x; Θ) + Z(F(x + Z(c)); Θ_c)."""

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from cnet import ControlledBlock, lock, trainable_copy


class ConvNormAct(nn.Sequential):
    def __init__(self, ch):
        super().__init__(nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(2, ch), nn.SiLU())


class ResidualBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.BatchNorm2d(ch),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


def _blocks():
    """(name, block, in_channels, out_channels, extra args factory)"""
    return [
        ("conv-norm-act", ConvNormAct(8), 8, 8, lambda n: ()),
        ("residual+bn+dropout", ResidualBlock(8), 8, 8, lambda n: ()),
        (
            "diffusers ResnetBlock2D",
            ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4),
            8,
            16,
            lambda n: (torch.randn(n, 12),),
        ),
        ("strided downsampler", nn.Conv2d(8, 8, 3, stride=2, padding=1), 8, 8, lambda n: ()),
    ]


BLOCKS = _blocks()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("idx", range(len(BLOCKS)), ids=[b[0] for b in BLOCKS])
def test_eq4_output_unchanged_bit_for_bit_at_init(idx, dtype):
    torch.manual_seed(idx)
    _, block, c_in, c_out, extra = _blocks()[idx]
    block = block.to(dtype)
    reference = copy.deepcopy(block).eval()  # F(x; Θ) before anything was wrapped
    x = torch.randn(3, c_in, 8, 8, dtype=dtype)
    c = torch.rand(3, 5, 8, 8, dtype=dtype)
    args = tuple(a.to(dtype) for a in extra(3))
    controlled = ControlledBlock(block, c_in, c_out, condition_channels=5).to(dtype)
    controlled.train()  # the trainable side in training mode, as during optimisation
    y = controlled.theta(x, *args)
    y_c = controlled(x, c, *args)
    assert torch.equal(y_c, y)
    assert torch.equal(y_c, reference(x, *args))


def _grad_count(module):
    return sum(int(torch.count_nonzero(p.grad)) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("idx", range(len(BLOCKS)), ids=[b[0] for b in BLOCKS])
def test_first_step_only_output_zero_conv_learns_then_everything_does(idx):
    torch.manual_seed(10 + idx)
    _, block, c_in, c_out, extra = _blocks()[idx]
    controlled = ControlledBlock(block, c_in, c_out, condition_channels=3)
    theta_before = {k: v.clone() for k, v in controlled.theta.state_dict().items()}
    trainable = [p for p in controlled.parameters() if p.requires_grad]
    assert {id(p) for p in trainable}.isdisjoint(id(p) for p in controlled.theta.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    x, c = torch.randn(2, c_in, 8, 8), torch.rand(2, 3, 8, 8)
    args = extra(2)

    def step():
        opt.zero_grad(set_to_none=False)
        out = controlled(x, c, *args)
        ((out - 1.0) ** 2).mean().backward()

    step()  # step 1: dZ2/dI = W_z2 = 0 cuts everything behind Θ_z2
    assert _grad_count(controlled.z2) > 0
    for p in controlled.theta_c.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in controlled.z1.parameters())
    assert all(p.grad is None for p in controlled.theta.parameters())
    opt.step()
    assert torch.count_nonzero(controlled.z2.weight) > 0  # Eq. 7

    step()  # step 2: W_z2 != 0 (Eq. 8), gradients reach Θ_c and Θ_z1
    assert _grad_count(controlled.theta_c) > 0
    assert torch.count_nonzero(controlled.z1.weight.grad) > 0
    opt.step()
    for k, v in controlled.theta.state_dict().items():
        assert torch.equal(v, theta_before[k]), f"locked parameter {k} changed"


def test_lock_keeps_eval_mode_and_trainable_copy_is_independent():
    torch.manual_seed(0)
    block = ResidualBlock(4)
    copy = trainable_copy(block)
    locked = lock(block)
    parent = nn.ModuleDict({"locked": locked, "copy": copy}).train()
    assert not locked.training and not any(m.training for m in locked.modules())
    assert copy.training and all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in locked.parameters())
    for (name, p), q in zip(locked.named_parameters(), copy.parameters()):
        assert torch.equal(p, q), name
        assert p.data_ptr() != q.data_ptr()
    # a copy of a locked module is trainable again, and its train() works
    again = trainable_copy(locked).train()
    assert again.training and all(p.requires_grad for p in again.parameters())
    # lock() works in place and hands back the module itself
    assert locked is block and parent["locked"] is block
    # a training step through the parent (in train mode) moves the copy and nothing locked:
    # the locked side has no trainable parameter, gets no gradient, and being in eval mode its
    # BatchNorm statistics do not move either
    locked_before = {k: v.clone() for k, v in locked.state_dict().items()}
    copy_before = {k: v.clone() for k, v in copy.state_dict().items()}
    trainable = [p for p in parent.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in copy.parameters()}
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    loss = ((parent["copy"](x) - target) ** 2).mean() + ((parent["locked"](x) - target) ** 2).mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in locked.parameters())
    for k, v in locked.state_dict().items():
        assert torch.equal(v, locked_before[k]), f"locked {k} changed"
    moved = {k for k, v in copy.named_parameters() if (v - copy_before[k]).abs().max() > 1e-4}
    # every parameter of the copy but the first conv's bias, which BatchNorm (in training
    # mode) subtracts right away, so that its gradient is zero up to rounding
    assert moved == {k for k, _ in copy.named_parameters()} - {"body.0.bias"}
    assert not torch.equal(copy.body[1].running_mean, copy_before["body.1.running_mean"])


def test_bad_inputs_name_the_expected_shape():
    controlled = ControlledBlock(ConvNormAct(8), 8, condition_channels=3)
    x, c = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 8, H, W\)"):
        controlled(torch.randn(2, 8, 8), c)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 8, H, W\)"):
        controlled(torch.randn(2, 6, 8, 8), c)
    with pytest.raises(ValueError, match=r"c: expected shape \(N, 3, H, W\), got \(2, 4, 8, 8\)"):
        controlled(x, torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"c: expected shape \(2, 3, 8, 8\) to match x"):
        controlled(x, torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"c: expected shape \(N, 3, H, W\)"):
        controlled(x, torch.rand(3, 8, 8))
    # a block whose output channels differ from the declared ones: Eq. 2's Z(.; Θ_z2) cannot fit
    wrong = ControlledBlock(nn.Conv2d(8, 6, 1), 8, condition_channels=3)
    with pytest.raises(ValueError, match=r"the block's output\): expected shape \(2, 8, H', W'\)"):
        wrong(x, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_zero_convolutions_follow_the_blocks_precision(dtype):
    # what a reader verifying Eq. 1-4 in float64 writes: no .to() on the ControlledBlock
    block = ConvNormAct(6).to(dtype)
    controlled = ControlledBlock(block, 6, condition_channels=3)
    assert {p.dtype for p in controlled.parameters()} == {dtype}
    x, c = torch.randn(2, 6, 8, 8, dtype=dtype), torch.rand(2, 3, 8, 8, dtype=dtype)
    assert torch.equal(controlled(x, c), controlled.theta(x))
