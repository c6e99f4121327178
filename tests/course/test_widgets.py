"""The explorers the notebooks let a learner play with: moving a control re-draws the figure and
the numbers under it are the library's (the real-browser test is tests/course/test_browser.py)."""

import copy
import math

import pytest
import torch

from cnet import ControlledBlock, guess_mode_scales
from cnet.course.figures import repo_root
from cnet.course.lessons import ConvNormAct, gradient_flow
from cnet.course.widgets import (
    SD15_RESIDUAL_HEIGHTS,
    GradientFlowExplorer,
    RunExplorer,
    ScalesExplorer,
    ZeroConvExplorer,
)


def test_zero_conv_explorer_contrasts_sgd_with_adamw():
    explorer = ZeroConvExplorer(lr=0.01, steps=5)
    sgd_image, sgd_step = explorer.image.value, explorer.trajectory.first_step
    explorer.optimizer.value = "adamw"
    adamw_step = explorer.trajectory.first_step
    assert explorer.image.value != sgd_image and "AdamW" in explorer.summary.value
    # Eq. 7 moves each entry by lr·|g|; AdamW's first step by lr·|g|/(|g| + eps), about lr
    assert max(adamw_step) <= 0.01 and min(adamw_step) > 0.01 * (1 - 1e-4)
    assert max(sgd_step) / min(sgd_step) > 2  # proportional to gradients of different sizes
    explorer.input_scale.value = 0.0  # no input, no weight gradient: W stays 0 for both
    assert explorer.trajectory.weight_norm[-1] == 0.0 and "never" in explorer.summary.value


def test_gradient_flow_explorer_steps_through_the_cascade():
    torch.manual_seed(0)
    controlled = ControlledBlock(copy.deepcopy(ConvNormAct(8)), 8, condition_channels=3)
    x, c, target = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    explorer = GradientFlowExplorer(gradient_flow(controlled, x, c, target, steps=3))
    first_image = explorer.image.value
    assert explorer.nonzero["z2"] > 0 and explorer.nonzero["theta_c"] == explorer.nonzero["z1"] == 0
    explorer.update_number.value = 2
    assert explorer.nonzero["theta_c"] > 0 and explorer.nonzero["z1"] > 0
    assert explorer.image.value != first_image and "update 2" in explorer.summary.value


def test_scales_explorer_draws_each_rule():
    explorer = ScalesExplorer()
    assert explorer.conditional == explorer.unconditional == (1.0,) * 13
    plain = explorer.image.value
    explorer.mode.value = "guess mode (released)"
    assert explorer.conditional == pytest.approx(guess_mode_scales(13, "released"))
    assert explorer.unconditional == (0.0,) * 13 and explorer.image.value != plain
    explorer.mode.value = "CFG resolution weighting"
    explorer.scale.value = 0.5
    assert explorer.conditional == tuple(0.5 * 64 / h for h in SD15_RESIDUAL_HEIGHTS)
    assert math.isclose(explorer.conditional[-1], 4.0)


def test_run_explorer_scrubs_the_shipped_run():
    explorer = RunExplorer(repo_root() / "models" / "controlnet-fill")
    assert explorer.iou == explorer.log.eval_iou[0] and explorer.step.value == 0
    first = explorer.image.value
    explorer.step.value = explorer.sample_steps[-1]
    assert explorer.iou == explorer.log.eval_iou[-1] and explorer.image.value != first
    assert f"step {explorer.sample_steps[-1]}: IoU" in explorer.summary.value
