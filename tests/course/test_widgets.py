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
    WIDGET_VIEW,
    GradientFlowExplorer,
    RunExplorer,
    ScalesExplorer,
    ZeroConvExplorer,
)


def test_an_explorer_displays_without_ipywidgets_8s_bundle(monkeypatch):
    """Colab ships ipywidgets 7.7, whose widgets have no _repr_mimebundle_: an explorer still
    offers its live view and its picture."""
    import ipywidgets

    explorer = ScalesExplorer()
    monkeypatch.delattr(ipywidgets.Widget, "_repr_mimebundle_")
    bundle = explorer._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == explorer.widget.model_id and bundle["image/png"]


def test_a_stored_explorer_shows_its_picture_not_the_widgets_text():
    """Displayed, an explorer offers the live widget and its figure as a PNG in one bundle: a
    front end without the widget's kernel (GitHub, an untrusted or unrun notebook) shows the
    picture; the text names the explorer and what it shows."""
    import base64

    import ipywidgets

    explorer = ZeroConvExplorer(lr=0.01, steps=5)
    bundle = explorer._repr_mimebundle_()
    # the same view ipywidgets 8 offers for the widget itself
    view = ipywidgets.VBox._repr_mimebundle_(explorer.widget)
    assert bundle[WIDGET_VIEW] == view[WIDGET_VIEW]
    assert bundle[WIDGET_VIEW]["model_id"] == explorer.widget.model_id
    assert base64.b64decode(bundle["image/png"]) == explorer.image.value
    assert bundle["image/png"] and bundle["text/plain"].startswith("ZeroConvExplorer: SGD")
    assert "VBox" not in bundle["text/plain"] and "<" not in bundle["text/plain"]


def test_the_store_keeps_an_explorers_picture_and_drops_its_widget_view():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "execute_notebooks", repo_root() / "scripts" / "execute_notebooks.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import nbformat

    bundle = ScalesExplorer()._repr_mimebundle_()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("ScalesExplorer()")
    bar = {"text/plain": "0%", script.WIDGET_VIEW: {"model_id": "x"}}  # a progress bar
    cell.outputs = [
        nbformat.v4.new_output("display_data", data=bundle),
        nbformat.v4.new_output("display_data", data=bar),
    ]
    nb.cells = [cell]
    script.clean(nb)
    (kept,) = nb.cells[0].outputs
    assert set(kept["data"]) == {"image/png", "text/plain"}


def test_zero_conv_explorer_contrasts_sgd_with_adamw():
    explorer = ZeroConvExplorer(lr=0.01, steps=5)
    sgd_image, sgd_step = explorer.image.value, explorer.trajectory.first_step
    explorer.optimizer.value = "adamw"
    adamw_step = explorer.trajectory.first_step
    assert explorer.image.value != sgd_image and "AdamW" in explorer.summary.value
    # Eq. 7 moves each entry by lr·|g|; AdamW's first step by lr·|g|/(|g| + eps), about lr
    assert max(adamw_step) <= 0.01 and min(adamw_step) > 0.01 * (1 - 1e-4)
    assert max(sgd_step) / min(sgd_step) > 2  # proportional to gradients of different sizes
    assert "by 1 × lr each" in explorer.summary.value  # not "by 1 to 1 × lr"
    explorer.input_scale.value = 0.0  # no input, no weight gradient: W stays 0 for both
    assert explorer.trajectory.weight_norm[-1] == 0.0 and "never" in explorer.summary.value


def test_the_zero_conv_plot_stays_readable_where_the_numbers_do_not():
    from cnet.course.lessons import zero_conv_trajectory
    from cnet.course.plots import RUNAWAY, plot_zero_conv_trajectory

    runaway = zero_conv_trajectory(lr=1.0, input_scale=3.0, steps=20)
    assert max(runaway.input_grad_norm) > 1e12  # plain gradient descent with too large a step
    fig = plot_zero_conv_trajectory(runaway)
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert low >= 0 or ax.get_title() == "loss"
        assert high < 10 * RUNAWAY  # the axis ends where the numbers stop being readable
    assert any("runs away" in t.get_text() for t in fig.axes[0].texts)
    silent = plot_zero_conv_trajectory(zero_conv_trajectory(input_scale=0.0))
    assert [t.get_text() for t in silent.axes[1].get_yticklabels()] == ["0"]
    assert any("exactly 0 at every step" in t.get_text() for t in silent.axes[1].texts)


def test_gradient_flow_explorer_steps_through_the_cascade():
    torch.manual_seed(0)
    controlled = ControlledBlock(copy.deepcopy(ConvNormAct(8)), 8, condition_channels=3)
    x, c, target = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    explorer = GradientFlowExplorer(gradient_flow(controlled, x, c, target, steps=3))
    first_image = explorer.image.value
    assert explorer.nonzero["z2"] > 0 and explorer.nonzero["theta_c"] == explorer.nonzero["z1"] == 0
    axis = explorer.ylim
    explorer.update_number.value = 2
    assert explorer.nonzero["theta_c"] > 0 and explorer.nonzero["z1"] > 0
    assert explorer.image.value != first_image and "update 2" in explorer.summary.value
    assert explorer.ylim == axis  # one scale for every update, so bars compare


def test_scales_explorer_draws_each_rule():
    explorer = ScalesExplorer()
    assert explorer.conditional == explorer.unconditional == (1.0,) * 13
    plain = explorer.image.value
    explorer.mode.value = "guess mode (released)"
    assert explorer.conditional == pytest.approx(guess_mode_scales(13, "released"))
    assert explorer.unconditional == (0.0,) * 13 and explorer.image.value != plain
    assert "unconditional branch: 0 (no control)" in explorer.legend  # zeros drawn, and said
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
