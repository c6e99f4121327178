"""Command line: ``python -m cnet <command>``.

    python -m cnet lessons     run the math lessons (Eq. 1–8) headless, print what they show and
                               write their figures to figures/
    python -m cnet train       train a ControlNet on the locked miniature base (profile quick on
                               CPU, full on CUDA; every setting is a flag: --steps, --lr, ...)
    python -m cnet compare     train runs that differ in one setting (--knob lr --values 1e-4
                               5e-4) and draw their fidelity curves side by side
    python -m cnet export      ship a finished run: its ControlNet as a diffusers ControlNetModel
                               folder, with the run's log, config and samples
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
        metavar = "true|false" if _flag_type(f) is _parse_bool else None
        parser.add_argument(f"--{f.name}", type=_flag_type(f), metavar=metavar)


def _flag_type(field: dataclasses.Field):
    """How a TrainConfig field's value is read from the command line."""
    if field.type in ("bool", bool):
        return _parse_bool
    return {"int": int, "float": float}.get(str(field.type), str)


def _train_settings(args: argparse.Namespace, profile: str) -> dict:
    """The profile's settings with every flag given on the command line on top."""
    from .train import PROFILES, TrainConfig

    settings = dict(PROFILES[profile])
    settings.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                     if getattr(args, f.name) is not None})
    return settings


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train, write_figures

    profile = args.profile or ("full" if torch.cuda.is_available() else "quick")
    config = TrainConfig(**_train_settings(args, profile))
    print(f"training a ControlNet ({config.task}) on {config.base}, profile {profile}, "
          f"{config.steps} steps, device {config.resolved_device()}")
    summary = train(config, profile=profile)
    print(f"done: {summary['steps']} steps in {summary['wall_time_s']} s; last evaluation "
          f"{summary['final_eval']}; outputs in {config.out}")
    label = f"profile {profile}, {summary['device_name']}, {config.steps} steps"
    for path in write_figures(config.out, prefix=f"05_{profile}", label=label):
        print(f"wrote {path}")


def run_compare(args: argparse.Namespace) -> None:
    import json

    from .paths import figures_dir
    from .plots import plot_knob_comparison
    from .train import TrainConfig, compare_runs, train

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if args.knob not in fields:
        raise SystemExit(f"--knob must be a TrainConfig setting ({', '.join(fields)}), "
                         f"got {args.knob!r}")
    settings = _train_settings(args, args.profile or "quick")
    kind = _flag_type(fields[args.knob])
    runs = {}
    for text in args.values:
        value = kind(text)
        config = TrainConfig(**{**settings, args.knob: value})
        # a run's folder is named by everything that differs from the defaults, so a run that
        # two comparisons share (their common baseline) is trained once and resumed after
        changed = [f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                   if f.name != "out" and getattr(config, f.name) != f.default]
        out = "runs/compare/" + ("_".join(changed) or "default")
        config = dataclasses.replace(config, out=out)
        print(f"--- {args.knob} = {text}: {config.steps} steps of batch {config.batch_size}"
              f" x {config.grad_accum}, lr {config.lr}, into {out}")
        train(config, profile=f"compare {args.knob}")
        runs[text] = out
    comparison = compare_runs(runs)
    for value, entry in comparison.items():
        print(f"{args.knob}={value}: final IoU {entry['eval_iou'][-1]:.3f}, "
              f"report {entry['report']}")
    name = f"05_compare_{args.knob}"
    path = save_figure(plot_knob_comparison(comparison, args.knob, label=args.label), name)
    data = figures_dir() / f"{name}.json"
    data.write_text(json.dumps(comparison, indent=1) + "\n")
    print(f"wrote {path} and {data}")


def run_export(args: argparse.Namespace) -> None:
    from .train import export_run

    out = export_run(args.run, args.out, samples_kept=args.samples_kept)
    print(f"shipped {args.run} to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lessons = sub.add_parser("lessons", help="run the math lessons headless, write figures")
    lessons.add_argument("--seed", type=int, default=0)
    lessons.add_argument("--steps", type=int, default=30)
    _add_train_flags(sub.add_parser("train", help="train a ControlNet on the miniature base"))
    compare = sub.add_parser("compare", help="runs that differ in one setting, side by side")
    compare.add_argument("--knob", required=True, help="the TrainConfig setting to vary")
    compare.add_argument("--values", required=True, nargs="+", help="its values, one run each")
    compare.add_argument("--label", default="", help="added to the figure's title")
    _add_train_flags(compare)
    export = sub.add_parser("export", help="ship a finished run as a diffusers ControlNetModel")
    export.add_argument("run", help="the run folder (holds checkpoint.safetensors)")
    export.add_argument("out", help="the folder to ship, e.g. models/controlnet-fill")
    export.add_argument("--samples_kept", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "lessons":
        run_lessons(seed=args.seed, steps=args.steps)
    elif args.command == "train":
        run_train(args)
    elif args.command == "compare":
        run_compare(args)
    elif args.command == "export":
        run_export(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
