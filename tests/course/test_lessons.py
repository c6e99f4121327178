"""The lesson experiments behind notebooks 01–02 and their ipywidgets explorer."""

import copy

import torch

from cnet import ControlledBlock
from cnet.course.lessons import (
    ConvNormAct,
    gaussian_connections_,
    gradient_flow,
    output_deviation,
    zero_conv_trajectory,
)
from cnet.course.widgets import ZeroConvExplorer


def test_trajectory_starts_at_zero_and_learns():
    t = zero_conv_trajectory(lr=0.1, input_scale=1.0, steps=30, seed=0)
    assert t.weight_norm[0] == 0.0 and t.input_grad_norm[0] == 0.0  # Eq. 6 at W = 0
    assert t.weight_norm[1] > 0 and t.input_grad_norm[1] > 0  # Eq. 7, Eq. 8
    assert t.loss[-1] < t.loss[0] / 10


def test_trajectory_with_zero_input_keeps_w_at_zero():
    t = zero_conv_trajectory(input_scale=0.0, steps=10)
    assert set(t.weight_norm) == {0.0} and set(t.input_grad_norm) == {0.0}
    assert t.bias_norm[-1] > 0


def test_gradient_flow_step_one_vs_step_two():
    torch.manual_seed(0)
    controlled = ControlledBlock(ConvNormAct(8), 8, condition_channels=3)
    x, c, target = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    flow = gradient_flow(controlled, x, c, target, steps=3)
    assert (flow.nonzero("z2", 0), flow.nonzero("theta_c", 0), flow.nonzero("z1", 0)) == (2, 0, 0)
    assert (flow.nonzero("z2", 1), flow.nonzero("theta_c", 1), flow.nonzero("z1", 1)) == (2, 4, 2)
    assert flow.deviation[0] == 0.0 and flow.deviation[1] > 0


def test_gaussian_connections_move_the_output_at_step_zero():
    torch.manual_seed(0)
    block = ConvNormAct(8)
    zero = ControlledBlock(copy.deepcopy(block), 8, condition_channels=3)
    gaussian = ControlledBlock(copy.deepcopy(block), 8, condition_channels=3)
    gaussian_connections_(gaussian, std=0.1, seed=0)
    x, c = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8)
    assert output_deviation(zero, x, c) == 0.0
    assert output_deviation(gaussian, x, c) > 0.01


def test_explorer_recomputes_when_a_slider_moves():
    explorer = ZeroConvExplorer(lr=0.1, input_scale=1.0, steps=10)
    image, summary = explorer.image.value, explorer.summary.value
    assert explorer.trajectory.weight_norm[-1] > 0 and len(image) > 1000

    explorer.input_scale.value = 0.0
    assert explorer.trajectory.weight_norm[-1] == 0.0
    assert explorer.image.value != image and explorer.summary.value != summary
    assert "never" in explorer.summary.value

    explorer.input_scale.value = 1.0
    explorer.steps.value = 30
    assert len(explorer.trajectory.weight_norm) == 31
    explorer.lr.value = 0.01
    slow = explorer.trajectory.weight_norm[1]
    explorer.lr.value = 0.1
    # Eq. 7: from W = 0 the first step is proportional to the learning rate
    assert abs(explorer.trajectory.weight_norm[1] - 10 * slow) < 1e-12
