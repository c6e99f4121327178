"""The lessons of notebooks 01–02 without a notebook (``python -m cnet lessons``): every fact is
computed, printed and drawn to figures/."""

from __future__ import annotations

import copy
import time

import torch

from ..block import ControlledBlock
from ..zero_conv import zero_conv_grads
from .figures import save_figure
from .lessons import (
    ConvNormAct,
    gaussian_connections_,
    gradient_flow,
    output_deviation,
    zero_conv_trajectory,
)
from .plots import (
    plot_gradient_flow,
    plot_output_deviation,
    plot_zero_conv_grads,
    plot_zero_conv_trajectory,
)

__all__ = ["run_lessons"]


def run_lessons(seed: int = 0, steps: int = 30) -> None:
    """Lessons 01–02 without a notebook: every fact is computed here, then printed."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    I = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    G = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    W, B = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    grad_I, grad_W, grad_B = zero_conv_grads(I, W, B, G)
    print("Eq. 6 at W = B = 0: non-zero entries of")
    print(f"  dL/dI {int(torch.count_nonzero(grad_I)):4d} of {grad_I.numel()}")
    print(f"  dL/dW {int(torch.count_nonzero(grad_W)):4d} of {grad_W.numel()}")
    print(f"  dL/dB {int(torch.count_nonzero(grad_B)):4d} of {grad_B.numel()}")
    written = [save_figure(plot_zero_conv_grads(grad_I, grad_W, grad_B), "01_zero_conv_grads")]

    t = zero_conv_trajectory(lr=0.1, steps=steps, seed=seed)
    print(
        f"Eq. 7-8, a zero conv trained {steps} steps (lr 0.1): ||W|| {t.weight_norm[0]:g} -> "
        f"{t.weight_norm[-1]:.4f}; ||dL/dI|| {t.input_grad_norm[0]:g} at step 0, "
        f"{t.input_grad_norm[1]:.4f} at step 1; loss {t.loss[0]:.4f} -> {t.loss[-1]:.4f}"
    )
    written.append(save_figure(plot_zero_conv_trajectory(t), "01_zero_conv_trajectory"))

    torch.manual_seed(seed)
    pretrained = ConvNormAct(8)
    x, c, target = torch.randn(4, 8, 16, 16), torch.rand(4, 3, 16, 16), torch.randn(4, 8, 16, 16)
    controlled = ControlledBlock(copy.deepcopy(pretrained), 8, condition_channels=3).train()
    print(
        f"Eq. 4: y_c == y bit for bit at init: {torch.equal(controlled(x, c), controlled.theta(x))}"
    )
    flow = gradient_flow(controlled, x, c, target, steps=steps)
    for step in (0, 1):
        print(
            f"  step {step + 1}: tensors with a non-zero gradient: "
            + ", ".join(
                f"{grp} {flow.nonzero(grp, step)}/{len(getattr(flow, grp))}"
                for grp in ("z2", "theta_c", "z1")
            )
        )
    written.append(save_figure(plot_gradient_flow(flow), "02_gradient_flow_step1_vs_step2"))

    gaussian = ControlledBlock(copy.deepcopy(pretrained), 8, condition_channels=3)
    gaussian_connections_(gaussian, std=0.1, seed=seed)
    print(
        f"Gaussian-initialised connections (std 0.1): ||y_c - y|| / ||y|| at step 0 = "
        f"{output_deviation(gaussian, x, c):.4f} (zero convolutions: {flow.deviation[0]:g})"
    )
    curves = {
        "zero convolutions": flow.deviation,
        "Gaussian init, std 0.1": gradient_flow(gaussian, x, c, target, steps).deviation,
    }
    written.append(save_figure(plot_output_deviation(curves), "02_zero_vs_gaussian_deviation"))

    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
