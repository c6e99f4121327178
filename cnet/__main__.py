"""Command line: ``python -m cnet <command>``.

    python -m cnet lessons     run the math lessons (Eq. 1–8) headless, print what they show and
                               write their figures to figures/
    python -m cnet train       train a ControlNet on the locked miniature base (profile quick on
                               CPU, full on CUDA; every setting is a flag: --steps, --lr, ...)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import matplotlib

matplotlib.use("Agg")  # the command line draws to files, never to a window

import torch  # noqa: E402

from . import ControlledBlock, zero_conv_grads  # noqa: E402
from .lessons import (  # noqa: E402
    ConvNormAct,
    gaussian_connections_,
    gradient_flow,
    output_deviation,
    zero_conv_trajectory,
)
from .plots import (  # noqa: E402
    plot_gradient_flow,
    plot_output_deviation,
    plot_zero_conv_grads,
    plot_zero_conv_trajectory,
    save_figure,
)


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
    print(f"Eq. 7-8, a zero conv trained {steps} steps (lr 0.1): ||W|| {t.weight_norm[0]:g} -> "
          f"{t.weight_norm[-1]:.4f}; ||dL/dI|| {t.input_grad_norm[0]:g} at step 0, "
          f"{t.input_grad_norm[1]:.4f} at step 1; loss {t.loss[0]:.4f} -> {t.loss[-1]:.4f}")
    written.append(save_figure(plot_zero_conv_trajectory(t), "01_zero_conv_trajectory"))

    torch.manual_seed(seed)
    pretrained = ConvNormAct(8)
    x, c, target = torch.randn(4, 8, 16, 16), torch.rand(4, 3, 16, 16), torch.randn(4, 8, 16, 16)
    controlled = ControlledBlock(copy.deepcopy(pretrained), 8, condition_channels=3).train()
    print(f"Eq. 4: y_c == y bit for bit at init: "
          f"{torch.equal(controlled(x, c), controlled.theta(x))}")
    flow = gradient_flow(controlled, x, c, target, steps=steps)
    for step in (0, 1):
        print(f"  step {step + 1}: tensors with a non-zero gradient: " + ", ".join(
            f"{grp} {flow.nonzero(grp, step)}/{len(getattr(flow, grp))}"
            for grp in ("z2", "theta_c", "z1")))
    written.append(save_figure(plot_gradient_flow(flow), "02_gradient_flow_step1_vs_step2"))

    gaussian = ControlledBlock(copy.deepcopy(pretrained), 8, condition_channels=3)
    gaussian_connections_(gaussian, std=0.1, seed=seed)
    print(f"Gaussian-initialised connections (std 0.1): ||y_c - y|| / ||y|| at step 0 = "
          f"{output_deviation(gaussian, x, c):.4f} (zero convolutions: {flow.deviation[0]:g})")
    curves = {"zero convolutions": flow.deviation,
              "Gaussian init, std 0.1": gradient_flow(gaussian, x, c, target, steps).deviation}
    written.append(save_figure(plot_output_deviation(curves), "02_zero_vs_gaussian_deviation"))

    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from .train import PROFILES, TrainConfig

    parser.add_argument("--profile", choices=sorted(PROFILES),
                        help="quick (CPU, minutes) or full (the shipped run); default: full on "
                             "CUDA, quick otherwise")
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name}", type=_parse_bool, metavar="true|false")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(f"--{f.name}", type=kind)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_train(args: argparse.Namespace) -> None:
    from .train import PROFILES, TrainConfig, train, write_figures

    profile = args.profile or ("full" if torch.cuda.is_available() else "quick")
    settings = dict(PROFILES[profile])
    settings.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                     if getattr(args, f.name) is not None})
    config = TrainConfig(**settings)
    print(f"training a ControlNet ({config.task}) on {config.base}, profile {profile}, "
          f"{config.steps} steps, device {config.resolved_device()}")
    summary = train(config, profile=profile)
    print(f"done: {summary['steps']} steps in {summary['wall_time_s']} s; last evaluation "
          f"{summary['final_eval']}; outputs in {config.out}")
    label = f"profile {profile}, {summary['device_name']}, {config.steps} steps"
    for path in write_figures(config.out, prefix=f"05_{profile}", label=label):
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lessons = sub.add_parser("lessons", help="run the math lessons headless, write figures")
    lessons.add_argument("--seed", type=int, default=0)
    lessons.add_argument("--steps", type=int, default=30)
    _add_train_flags(sub.add_parser("train", help="train a ControlNet on the miniature base"))
    args = parser.parse_args(argv)
    if args.command == "lessons":
        run_lessons(seed=args.seed, steps=args.steps)
    elif args.command == "train":
        run_train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
