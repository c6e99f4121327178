"""ipywidgets explorers for the notebooks.

Each explorer keeps its last result on the object (``.trajectory``, ``.sample``), renders its
figure into an ``ipywidgets.Image`` and its facts into an ``HTML`` line, so it works in Jupyter,
Colab and VS Code alike, and can be driven from a test without a kernel.
"""

from __future__ import annotations

import io

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

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


class ControlExplorer:
    """Conditioning scale, control window, guidance and condition → one sample of a trained
    ControlNet, re-drawn on every change (DDIM, ``steps`` steps, the same starting noise), with
    its fidelity (:func:`cnet.train.fidelity`) beside it. ``data`` is an evaluation set from
    :func:`cnet.train.cache_data`; the last sample is kept as ``.sample``, its IoU as ``.iou``."""

    def __init__(self, pipe, controlled, data, steps: int = 10, guidance: float = 3.0,
                 seed: int = 0):
        self.pipe, self.controlled, self.data, self.steps, self.seed = (pipe, controlled, data,
                                                                         steps, seed)
        self.scale = widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05,
                                         description="scale")
        self.window = widgets.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05,
                                               description="window")
        self.guidance = widgets.FloatSlider(value=guidance, min=1.0, max=9.0, step=0.5,
                                            description="guidance")
        self.condition = widgets.IntSlider(value=0, min=0, max=len(data.condition) - 1,
                                           description="condition")
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        for control in (self.scale, self.window, self.guidance, self.condition):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.scale, self.window]), widgets.HBox([self.guidance, self.condition]),
            self.summary, self.image,
        ])
        self.update()

    def update(self) -> None:
        from ..sample import sample
        from ..train.evaluate import fidelity

        i, (start, end) = self.condition.value, self.window.value
        extras = self.data.extras
        condition = self.data.condition[i : i + 1]
        try:
            self.sample = sample(
                self.pipe, self.controlled, extras["prompt"][i : i + 1], condition,
                num_inference_steps=self.steps, guidance_scale=self.guidance.value,
                scales=self.scale.value, control_guidance_start=start, control_guidance_end=end,
                generator=torch.Generator(self.pipe.unet.device).manual_seed(self.seed),
            ).float().cpu()
        except ValueError as error:  # e.g. an empty window: say so, keep the last picture
            self.summary.value = f"not sampled: {error}"
            return
        measured = fidelity(self.sample, extras["foreground"][i : i + 1],
                            extras["background"][i : i + 1], extras["region"][i : i + 1],
                            extras.get("style", "plain"))
        self.iou = float(measured["iou"][0])
        self.summary.value = (
            f"“{extras['prompt'][i]}”: IoU with the requested disc {self.iou:.3f}, both colours "
            f"drawn: {'yes' if bool(measured['colours_ok'][0]) else 'no'}"
        )
        fig, axes = plt.subplots(1, 2, figsize=(3.6, 1.9))
        axes[0].imshow(condition[0].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[1].imshow(((self.sample[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(),
                       interpolation="nearest")
        for ax, title in zip(axes, ("condition", f"s = {self.scale.value:.2f}"), strict=True):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        self.image.value = _png(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
