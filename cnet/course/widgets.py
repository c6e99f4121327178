"""ipywidgets explorers for the notebooks.

Each explorer keeps its last result on the object (``.trajectory``, ``.sample``), renders its
figure into an ``ipywidgets.Image`` and its facts into an ``HTML`` line, so it works in Jupyter,
Colab and VS Code alike, and can be driven from a test without a kernel.

Displayed, an explorer offers the live widget and, in the same output, its current figure as a
PNG: a front end with a kernel draws the widget, while a stored notebook (on GitHub, in Colab
before it runs, after a reload) shows the picture instead of the widget's text.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D

from .lessons import zero_conv_trajectory
from .plots import plot_gradient_flow, plot_zero_conv_trajectory

#: The mime type under which Jupyter front ends draw a live widget.
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _png(fig: plt.Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _row(*controls) -> widgets.HBox:
    # a row of controls that wraps where the page is narrower than they are
    return widgets.HBox(list(controls), layout=widgets.Layout(flex_flow="row wrap"))


def _picture() -> widgets.Image:
    # drawn at its own size: a flex column would otherwise stretch it (and blur it) to its width
    return widgets.Image(format="png", layout=widgets.Layout(align_self="flex-start"))


def _wide(width: str = "340px") -> dict:
    """Keyword arguments that give a control its whole label and a track long enough to read."""
    return {"style": {"description_width": "initial"}, "layout": widgets.Layout(width=width)}


class _Explorer:
    """What every explorer shares: Jupyter shows its ``widget`` (controls, summary, figure),
    with the figure as a PNG beside it for a front end that cannot draw the widget."""

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        summary = html.unescape(re.sub(r"<[^>]+>", "", self.summary.value))
        return {
            # the widget view as ipywidgets 7 and 8 both display it (7.7, Colab's, has no
            # _repr_mimebundle_ of its own to ask)
            WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id},
            "image/png": base64.b64encode(self.image.value).decode("ascii"),
            "text/plain": f"{type(self).__name__}: {summary}",
        }


class ZeroConvExplorer(_Explorer):
    r"""Optimizer, learning rate, input scale and number of steps → how W leaves zero and when
    :math:`\partial Z/\partial I` appears (Eq. 6–8). Plain gradient descent is Eq. 7's step,
    :math:`-\mathrm{lr}\,g`; AdamW, which training uses, moves every entry by about lr at its first
    update (:math:`-\mathrm{lr}\,\mathrm{sign}(g)`). Input scale 0 shows the caveat: W stays 0."""

    OPTIMIZERS = (("SGD (Eq. 7)", "sgd"), ("AdamW", "adamw"))

    def __init__(
        self,
        lr: float = 0.1,
        input_scale: float = 1.0,
        steps: int = 20,
        seed: int = 0,
        optimizer: str = "sgd",
    ):
        self.seed = seed
        self.optimizer = widgets.ToggleButtons(
            options=self.OPTIMIZERS, value=optimizer, description="optimizer"
        )
        self.lr = widgets.FloatLogSlider(
            value=lr, base=10, min=-4, max=0, step=0.25, description="learning rate", **_wide()
        )
        self.input_scale = widgets.FloatSlider(
            value=input_scale, min=0.0, max=3.0, step=0.25, description="input scale", **_wide()
        )
        self.steps = widgets.IntSlider(value=steps, min=1, max=100, description="steps", **_wide())
        self.image = _picture()
        self.summary = widgets.HTML()
        for control in (self.optimizer, self.lr, self.input_scale, self.steps):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox(
            [
                self.optimizer,
                _row(self.lr, self.input_scale, self.steps),
                self.summary,
                self.image,
            ]
        )
        self.update()

    def update(self) -> None:
        lr, name = self.lr.value, dict((v, k) for k, v in self.OPTIMIZERS)[self.optimizer.value]
        self.trajectory = t = zero_conv_trajectory(
            lr=lr,
            input_scale=self.input_scale.value,
            steps=self.steps.value,
            seed=self.seed,
            optimizer=self.optimizer.value,
        )
        rule = (
            "lr·|g| each, proportional to its gradient"
            if self.optimizer.value == "sgd"
            else "about lr each, whatever its gradient: −lr·sign(g)"
        )
        opened = len(t.input_grad_norm) > 1 and t.input_grad_norm[1] > 0
        low, high = f"{min(t.first_step) / lr:.3g}", f"{max(t.first_step) / lr:.3g}"
        moved = f"by {low} × lr each" if low == high else f"by {low} to {high} × lr"
        self.summary.value = (
            f"{name}: update 1 moves W's entries {moved} ({rule}). ‖W‖: 0 at step 0 → "
            f"{t.weight_norm[-1]:.4g} after {self.steps.value} steps. ∂L/∂I: 0 at step 0 "
            f"(Eq. 6), {'non-zero from step 1 (Eq. 8)' if opened else 'never non-zero: W stays 0'}."
        )
        self.image.value = _png(plot_zero_conv_trajectory(t, title=name))


class GradientFlowExplorer(_Explorer):
    """Step through the updates of a :func:`cnet.course.lessons.gradient_flow` run: which of the
    controlled block's parameters get gradient at update k (exact zeros drawn hollow)."""

    GROUPS = (("z2", "Θ_z2 (out)"), ("theta_c", "Θ_c (copy)"), ("z1", "Θ_z1 (in)"))

    def __init__(self, flow):
        self.flow = flow
        self.update_number = widgets.IntSlider(
            value=1, min=1, max=len(flow.loss), description="update"
        )
        self.image = _picture()
        self.summary = widgets.HTML()
        self.update_number.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox([self.update_number, self.summary, self.image])
        self.update()

    def update(self) -> None:
        k = self.update_number.value
        self.nonzero = {g: self.flow.nonzero(g, k - 1) for g, _ in self.GROUPS}
        self.summary.value = f"update {k}: non-zero gradient in " + ", ".join(
            f"{label} {self.nonzero[g]} of {len(getattr(self.flow, g))} tensors"
            for g, label in self.GROUPS
        )
        # the same axis at every update, so that bars compare across updates
        fig = plot_gradient_flow(self.flow, steps=(k - 1,), all_steps=True)
        fig.axes[0].set_title(f"Where the gradient flows at update {k}", fontsize=10)
        self.ylim = fig.axes[0].get_ylim()
        self.image.value = _png(fig)


#: The heights of SD1.5's 13 residuals for 512-pixel images (latents 64 × 64).
SD15_RESIDUAL_HEIGHTS = (64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8)


class ScalesExplorer(_Explorer):
    """Control scale and mode → the factor each of the 13 residuals is multiplied by, on the
    conditional and on the unconditional branch of classifier-free guidance: plain control,
    guess mode (the released and diffusers ramps) and CFG resolution weighting (ICCV §3.4)."""

    MODES = (
        ("plain", None),
        ("guess mode (released)", "released"),
        ("guess mode (diffusers)", "diffusers"),
        ("CFG resolution weighting", "cfg_rw"),
    )

    def __init__(self, heights=SD15_RESIDUAL_HEIGHTS):
        self.heights = tuple(heights)
        self.scale = widgets.FloatSlider(
            value=1.0, min=0.0, max=2.0, step=0.05, description="scale", **_wide()
        )
        self.mode = widgets.Dropdown(
            options=[m for m, _ in self.MODES], value="plain", description="mode", **_wide()
        )
        self.image = _picture()
        self.summary = widgets.HTML()
        for control in (self.scale, self.mode):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox([_row(self.scale, self.mode), self.summary, self.image])
        self.update()

    def update(self) -> None:
        from ..residuals import control_scales

        rule = dict(self.MODES)[self.mode.value]
        n = len(self.heights)
        self.conditional = control_scales(
            n, self.scale.value, rule is not None, rule or "released", self.heights
        )
        # plain control reaches both branches; guess mode and CFG-RW the conditional one only
        self.unconditional = self.conditional if rule is None else (0.0,) * n
        fig, ax = plt.subplots(figsize=(7, 2.8))
        xs = range(n)
        ax.bar([x - 0.2 for x in xs], self.conditional, 0.4, label="conditional branch")
        if any(self.unconditional):
            ax.bar([x + 0.2 for x in xs], self.unconditional, 0.4, label="unconditional branch")
        else:  # a zero-height bar cannot be seen: mark each zero where its bar would stand
            ax.plot(
                [x + 0.2 for x in xs],
                self.unconditional,
                "_",
                ms=10,
                mew=2,
                color="tab:orange",
                label="unconditional branch: 0 (no control)",
            )
        ax.set_xticks(list(xs), [f"{i}\n{h}" for i, h in enumerate(self.heights)], fontsize=7)
        ax.set_xlabel("residual i / its height h_i (the last one: the middle block)")
        ax.set_ylabel("factor s_i")
        ax.set_title(f"{self.mode.value}, scale {self.scale.value:.2f}", fontsize=10)
        ax.set_ylim(0, 1.3 * max(1.0, *self.conditional))
        self.legend = [t.get_text() for t in ax.legend(fontsize=8, ncol=2, loc="upper left").texts]
        fig.tight_layout()
        self.image.value = _png(fig)
        self.summary.value = (
            f"{self.mode.value}: residual 0 × {self.conditional[0]:.3g}, the "
            f"middle one × {self.conditional[-1]:.3g} (conditional branch)"
        )


class RunExplorer(_Explorer):
    """Scrub through a training run (a run folder or a shipped ControlNet): its samples at
    evaluation step k beside their conditions, and the fidelity and the zero convolutions'
    norms up to k, on one time axis."""

    #: how the zero convolutions' norms are drawn: the condition encoder's last one, the middle
    #: block's, the 12 of the encoder blocks
    NORM_COLOURS = {
        "hint": ("tab:red", "condition encoder's"),
        "mid": ("black", "middle block's"),
        "": ("tab:gray", "the 12 blocks'"),
    }

    def __init__(self, run, rows: int = 6):
        from safetensors.torch import load_file

        from ..train.data import condition_images
        from ..train.runs import read_config, read_log

        self.log, self.samples = read_log(run), load_file(Path(run) / "samples.safetensors")
        self.sample_steps = sorted(int(k.split("_")[1]) for k in self.samples)
        config = read_config(run)
        first = self.samples[f"step_{self.sample_steps[0]}"]
        self.rows = min(rows, len(first))
        self.conditions = condition_images(
            config.task, config.eval_size, config.seed, resolution=first.shape[-1]
        )[: self.rows]
        self.step = widgets.SelectionSlider(
            options=self.sample_steps,
            value=self.sample_steps[0],
            description="step",
            **_wide(f"{min(900, 200 + 16 * len(self.sample_steps))}px"),  # a few px a position
        )
        self.image = _picture()
        self.summary = widgets.HTML()
        self.step.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox([self.step, self.summary, self.image])
        self.update()

    def update(self) -> None:
        k, log = self.step.value, self.log
        self.iou = next((f for s, f in zip(log.eval_steps, log.eval_iou) if s == k), None)
        norms = log.weight_norm
        at = max(i for i, s in enumerate(log.steps) if s <= k)
        mid = norms.get("zero_conv.mid", next(iter(norms.values())))[at]
        self.summary.value = (
            f"step {k}: IoU {self.iou:.3f}" if self.iou is not None else f"step {k}"
        ) + f"; the middle zero conv's norm {mid:.3g}"
        fig = plt.figure(figsize=(8, 4.2))
        grid = fig.add_gridspec(3, self.rows)
        images = self.samples[f"step_{k}"][: self.rows]
        for i in range(self.rows):
            for row, picture in ((0, self.conditions[i]), (1, images[i].float() / 255)):
                ax = fig.add_subplot(grid[row, i])
                ax.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.axis("off")
        # the curves' row has its own spacing: room for the right panel's label and ticks
        bottom = grid[2, :].subgridspec(1, 2, wspace=0.3)
        curve, growth = fig.add_subplot(bottom[0]), fig.add_subplot(bottom[1])
        curve.plot(log.eval_steps, log.eval_iou, color="tab:green")
        curve.set_ylabel("IoU", fontsize=8)
        for name, values in norms.items():
            kind = "hint" if name.endswith("hint") else ("mid" if name.endswith("mid") else "")
            growth.plot(log.steps, values, lw=0.8, color=self.NORM_COLOURS[kind][0])
        growth.legend(
            handles=[
                Line2D([], [], color=c, lw=1, label=label)
                for c, label in self.NORM_COLOURS.values()
            ],
            fontsize=6,
            loc="upper left",
        )
        growth.set_ylabel("zero conv ‖(W, B)‖", fontsize=8, labelpad=6)
        for ax in (curve, growth):
            ax.axvline(k, color="tab:blue", lw=1)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("training step", fontsize=8)
        fig.suptitle(f"conditions / samples at step {k}", fontsize=9)
        self.image.value = _png(fig)


class ControlExplorer(_Explorer):
    """Conditioning scale, control window, guidance and condition → one sample of a trained
    ControlNet, re-drawn on every change (DDIM, ``steps`` steps, the same starting noise), with
    its fidelity (:func:`cnet.train.fidelity`) beside it. ``data`` is an evaluation set from
    :func:`cnet.train.cache_data`; the last sample is kept as ``.sample``, its IoU as ``.iou``."""

    def __init__(
        self, pipe, controlled, data, steps: int = 10, guidance: float = 3.0, seed: int = 0
    ):
        self.pipe, self.controlled, self.data, self.steps, self.seed = (
            pipe,
            controlled,
            data,
            steps,
            seed,
        )
        self.scale = widgets.FloatSlider(
            value=1.0, min=0.0, max=2.0, step=0.05, description="scale", **_wide()
        )
        # the range's own readout does not fit its box: the window is read out beside it
        self.window = widgets.FloatRangeSlider(
            value=(0.0, 1.0),
            min=0.0,
            max=1.0,
            step=0.05,
            description="window",
            readout=False,
            **_wide(),
        )
        self.window_readout = widgets.Label()
        self.guidance = widgets.FloatSlider(
            value=guidance, min=1.0, max=9.0, step=0.5, description="guidance", **_wide()
        )
        self.condition = widgets.IntSlider(
            value=0, min=0, max=len(data.condition) - 1, description="condition", **_wide()
        )
        self.image = _picture()
        self.summary = widgets.HTML()
        self._last = None  # the last picture drawn: (condition, sample, caption)
        for control in (self.scale, self.window, self.guidance, self.condition):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox(
            [
                _row(self.scale, self.window, self.window_readout),
                _row(self.guidance, self.condition),
                self.summary,
                self.image,
            ]
        )
        self.update()

    def update(self) -> None:
        from ..sample import controlled_steps, sample
        from ..train.evaluation import fidelity

        i, (start, end) = self.condition.value, self.window.value
        steps = controlled_steps(self.steps, start, end)
        self.window_readout.value = (
            f"steps {steps[0] + 1}–{steps[-1] + 1} of {self.steps} controlled"
            if steps
            else f"no step of {self.steps} controlled"
        )
        caption = (
            f"s = {self.scale.value:.2f}, window {start:.2f}–{end:.2f}, w = {self.guidance.value:g}"
        )
        if not steps:  # control would act on no sampling step: say so rather than draw the base
            self.summary.value = (
                f"<b>The window {start:.2f}–{end:.2f} holds no sampling step</b> (step i of "
                f"{self.steps} is controlled when start ≤ i/{self.steps} and (i + 1)/{self.steps} "
                "≤ end): widen it to sample; the picture below (faded) is the last one."
            )
            if self._last is not None:
                self.image.value = self._draw(*self._last, stale=True)
            return
        extras = self.data.extras
        condition = self.data.condition[i : i + 1]
        self.sample = (
            sample(
                self.pipe,
                self.controlled,
                extras["prompt"][i : i + 1],
                condition,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance.value,
                scales=self.scale.value,
                control_guidance_start=start,
                control_guidance_end=end,
                generator=torch.Generator(self.pipe.unet.device).manual_seed(self.seed),
            )
            .float()
            .cpu()
        )
        measured = fidelity(
            self.sample,
            extras["foreground"][i : i + 1],
            extras["background"][i : i + 1],
            extras["region"][i : i + 1],
            extras.get("style", "plain"),
        )
        self.iou = float(measured["iou"][0])
        self.summary.value = (
            f"“{extras['prompt'][i]}”: IoU with the requested disc {self.iou:.3f}, both colours "
            f"drawn: {'yes' if bool(measured['colours_ok'][0]) else 'no'}"
        )
        self._last = (condition[0], self.sample[0], caption)
        self.image.value = self._draw(*self._last)

    @staticmethod
    def _draw(condition: torch.Tensor, drawn: torch.Tensor, caption: str, stale: bool = False):
        fig, axes = plt.subplots(1, 2, figsize=(5.0, 2.8))
        axes[0].imshow(condition.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[1].imshow(
            ((drawn + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(),
            interpolation="nearest",
            alpha=0.35 if stale else 1.0,
        )
        titles = ("condition", f"last sample ({caption})" if stale else caption)
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        return _png(fig, dpi=100)
