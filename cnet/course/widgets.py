"""ipywidgets explorers for the notebooks.

Each explorer keeps its last result on the object (``.trajectory``), renders its figure into an
``ipywidgets.Image`` and its facts into an ``HTML`` line, so it works in Jupyter, Colab and
VS Code alike, and can be driven from a test without a kernel.
"""

from __future__ import annotations

import io

import ipywidgets as widgets
import matplotlib.pyplot as plt

from .lessons import zero_conv_trajectory
from .plots import plot_zero_conv_trajectory


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


class ZeroConvExplorer:
    r"""Learning rate, input scale and number of steps → how W leaves zero (Eq. 7) and when
    :math:`\partial Z/\partial I` appears (Eq. 8). Input scale 0 shows the caveat: W stays 0."""

    def __init__(self, lr: float = 0.1, input_scale: float = 1.0, steps: int = 20, seed: int = 0):
        self.seed = seed
        self.lr = widgets.FloatLogSlider(value=lr, base=10, min=-4, max=0, step=0.25,
                                         description="learning rate")
        self.input_scale = widgets.FloatSlider(value=input_scale, min=0.0, max=3.0, step=0.25,
                                               description="input scale")
        self.steps = widgets.IntSlider(value=steps, min=1, max=100, description="steps")
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        for control in (self.lr, self.input_scale, self.steps):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox(
            [widgets.HBox([self.lr, self.input_scale, self.steps]), self.summary, self.image]
        )
        self.update()

    def update(self) -> None:
        self.trajectory = t = zero_conv_trajectory(
            lr=self.lr.value, input_scale=self.input_scale.value, steps=self.steps.value,
            seed=self.seed,
        )
        opened = next((k for k, g in enumerate(t.input_grad_norm) if g > 0), None)
        self.summary.value = (
            f"‖W‖: {t.weight_norm[0]:g} at step 0 → {t.weight_norm[-1]:.4g} after "
            f"{self.steps.value} steps. ∂L/∂I first non-zero at step "
            f"{opened if opened is not None else 'never'} (‖∂L/∂I‖ = "
            f"{t.input_grad_norm[-1]:.4g} at the end)."
        )
        self.image.value = _png(plot_zero_conv_trajectory(t))

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
