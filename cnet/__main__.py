"""Command line: ``python -m cnet <command>``; ``python -m cnet <command> -h`` lists its flags.

    python -m cnet lessons     the math lessons (Eq. 1–8) headless, with their figures
    python -m cnet train       train a ControlNet on the locked miniature base (profile quick on
                               CPU, full on CUDA; every setting is a flag: --steps, --lr, ...)
    python -m cnet compare     runs that differ in one setting, fidelity curves side by side
    python -m cnet recipe      the recipe study: settings over seeds, each continued to 2× steps
    python -m cnet ablate      the paper's ablations over seeds (notebook 07's figures)
    python -m cnet compare-methods  ControlNet and the methods after it, side by side (08)
    python -m cnet export      ship a finished run as a diffusers ControlNetModel folder
    python -m cnet sample      generate from a run's checkpoint or a shipped ControlNet
    python -m cnet evaluate    a ControlNet, the base alone and the VAE's ceiling, measured
    python -m cnet bench       speed and memory as ratios measured side by side
    python -m cnet course      stamp a fork's URL into the notebooks and the README's Colab links
    python -m cnet control     notebook 06's measurements of a shipped ControlNet

A bad setting is refused with one line naming it, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # the command line draws to files, never to a window

import torch  # noqa: E402

from .train.config import (  # noqa: E402
    PROFILES,
    SettingError,
    TrainConfig,
    add_flags,
    for_method,
    resolve_device,
    settings_from_flags,
)
from .train.loop import TrainingDiverged  # noqa: E402


def _train_settings(args: argparse.Namespace, default_profile: str) -> tuple[str, TrainConfig]:
    profile = args.profile or default_profile
    values = for_method(PROFILES[profile], getattr(args, "method", None) or "controlnet")
    return profile, settings_from_flags(TrainConfig, args, values).check()


def run_train(args: argparse.Namespace) -> None:
    from .course.figures import write_run_figures
    from .processes import process_state
    from .train import train

    profile, config = _train_settings(args, "full" if torch.cuda.is_available() else "quick")
    if not process_state(config.device == "cpu").is_main_process:
        train(config, profile=profile)  # one of several processes: the main one reports
        return
    what = f"the pairs in {config.data}" if config.data else config.task
    kind = {"t2i-adapter": "a T2I-Adapter", "controlnet-xs": "a ControlNet-XS"}.get(
        config.method, "a ControlNet" if config.method == "controlnet" else "a whole U-Net"
    )
    print(
        f"training {kind} ({what}) on {config.base}, profile {profile}, "
        f"{config.steps} steps, device {resolve_device(config.device)}"
    )
    summary = train(config, profile=profile)
    print(
        f"done: {summary['steps']} steps in {summary['wall_time_s']} s; last evaluation "
        f"{summary['final_eval']}; outputs in {config.out}"
    )
    if config.eval_every == 0:
        print("no evaluations (--eval_every 0), so no fidelity figures")
        return
    if config.data:
        print(
            f"validation grids (conditions above samples) in {config.out}/validation; "
            f"edge F1 per evaluation in {config.out}/log.jsonl"
        )
        return
    if config.method != "controlnet":
        print(f"fidelity per evaluation in {config.out}/log.jsonl (figures: ControlNet runs only)")
        return
    label = f"profile {profile}, {summary['device_name']}, {config.steps} steps"
    prefix = f"05_{profile}_" if args.figures else ""
    for path in write_run_figures(config.out, args.figures, prefix=prefix, label=label):
        print(f"wrote {path}")


def run_compare(args: argparse.Namespace) -> None:
    from .course.figures import save_figure, save_numbers
    from .course.training_plots import plot_knob_comparison
    from .experiments.compare import compare_runs, train_comparison

    _, settings = _train_settings(args, "quick")  # comparisons are quick runs unless asked
    comparison = compare_runs(train_comparison(settings, args.knob, args.values))
    for value, entry in comparison.items():
        print(
            f"{args.knob}={value}: final IoU {entry['eval_iou'][-1]:.3f}, report {entry['report']}"
        )
    name = f"05_compare_{args.knob}"
    path = save_figure(plot_knob_comparison(comparison, args.knob, label=args.label), name)
    print(f"wrote {path} and {save_numbers(comparison, name)}")


def run_ablate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .experiments.ablate import (
        STUDIES,
        ablation_config,
        read_step_time,
        run_studies,
        train_variant,
    )

    studies = args.studies or list(STUDIES)
    step_time = read_step_time(args.step_time_from) if args.step_time_from else None
    if args.variants:  # train just these (e.g. to split the runs over several processes)
        for variant in args.variants:
            for seed in args.seeds:
                ablation_config(variant, seed, args.root)  # every name checked first
        for variant in args.variants:
            for seed in args.seeds:
                train_variant(variant, seed, args.root)
        return
    if not args.no_train:
        run_studies(studies, args.seeds, args.root)
    if args.no_summary:
        return
    from .course.ablation_plots import write_ablation_figures
    from .course.ablation_report import summarize_ablations

    command = "python -m cnet " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    result = summarize_ablations(studies, args.seeds, args.root, step_time, command.strip())
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    print(f"wrote {out}")
    if args.figures:  # beside the results only when asked: never over the shipped figures
        for path in write_ablation_figures(result, out.parent):
            print(f"wrote {path}")


def run_compare_methods(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .course.methods import write_method_figures
    from .experiments.methods import compare_methods

    command = "python -m cnet " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    result = compare_methods(args.methods, args.seeds, args.root, not args.no_train, command)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if args.figures:  # beside the results only when asked: never over the shipped figures
        for path in write_method_figures(result, out.parent, args.root):
            print(f"wrote {path}")


def run_recipe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .experiments.profiles import profile_check
    from .experiments.recipe import RECIPES, read_study, recipe_study

    command = "python -m cnet " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    root = args.root or ("runs/full-check" if args.profile else "runs/recipe")
    args.root, args.results = root, args.results or f"{root}/{args.profile or 'recipe'}_study.json"
    if args.profile:  # a profile as it stands over the seeds, instead of the recipes
        if args.recipes or args.check or args.earlier:
            raise SettingError(f"profile: {args.profile!r} takes no --recipes/check/earlier")
        options = (not args.no_train, command.strip(), not args.no_continuation)
        result = profile_check(args.profile, args.seeds, root, *options)
    else:
        result = recipe_study(
            args.recipes or list(RECIPES),
            args.seeds,
            args.root,
            train=not args.no_train,
            check_seeds=args.check_seeds if args.check else None,
            check_root=args.check_root,
            command=command.strip(),
            continued=not args.no_continuation,
            earlier=None if args.earlier is None else read_study(args.earlier),
        )
    if not args.no_summary:
        out = Path(args.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    if args.figures:
        from .course.figures import write_recipe_figures

        for path in write_recipe_figures(result, Path(args.results).parent):
            print(f"wrote {path}")


def run_export(args: argparse.Namespace) -> None:
    from .train.runs import export_run

    if args.samples_kept < 1:
        raise SettingError(
            f"samples_kept: {args.samples_kept!r} is not allowed; expected an integer >= 1"
        )
    out = export_run(
        args.run, args.out, samples_kept=args.samples_kept, half=args.half, weights=args.weights
    )
    print(f"shipped {args.run} to {out}")


def _check_measurement(args: argparse.Namespace) -> None:
    if not 2 <= args.samples <= 1000:
        raise SettingError(
            f"samples: {args.samples!r} is not allowed; expected an integer from 2 to 1000"
        )
    if args.threads < 1:
        raise SettingError(f"threads: {args.threads!r} is not allowed; expected an integer >= 1")
    if getattr(args, "seed", 0) < 0:
        raise SettingError(f"seed: {args.seed!r} is not allowed; expected an integer >= 0")


def run_control(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .course.control import control_figures
    from .course.figures import save_figure, save_numbers
    from .experiments.control import control_measurements

    _check_measurement(args)
    torch.set_num_threads(args.threads)
    numbers, images = control_measurements(
        args.folder, args.base, args.fine_tune, args.segmentation, args.samples, args.profile
    )
    figures = control_figures(numbers, images, Path(args.folder).name, Path(args.fine_tune).name)
    for name, fig in figures.items():
        print(f"wrote {save_figure(fig, name)}")
    print(f"wrote {save_numbers(numbers, '06_control')}")


def run_evaluate(args: argparse.Namespace) -> None:
    from .train.evaluation import measure_folder

    _check_measurement(args)
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if args.argv is None else args.argv
    evaluation = measure_folder(
        args.folder,
        args.weights,
        args.base,
        args.samples,
        args.profile,
        seed=args.seed,
        command=" ".join(["python", "-m", "cnet", *argv]),
    )
    print(json.dumps(evaluation, indent=2))


def run_lessons(args: argparse.Namespace) -> None:
    from .course.headless import run_lessons as lessons

    if args.steps < 2:
        raise SettingError(f"steps: {args.steps!r} is not allowed; expected an integer >= 2")
    lessons(seed=args.seed, steps=args.steps)


def run_course(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .course.colab import colab_link, stamp_repository

    root = Path(args.root)
    if not ((root / "notebooks").is_dir() and (root / "README.md").is_file()):
        raise SettingError(
            f"root: {args.root!r} is not a clone of the repository (expected "
            "notebooks/ and README.md in it)"
        )
    for path in stamp_repository(args.repo, root, args.branch):
        print(f"stamped {path.relative_to(root)}")
    if args.repo and colab_link(args.repo, "README.md") is None:
        print(f"note: {args.repo} is not on GitHub, so the README lists no Colab links")


def run_sample(args: argparse.Namespace) -> None:
    from .train.evaluation import sample_files

    if args.steps < 1 or args.guidance < 0:
        raise SettingError(
            f"steps, guidance: {args.steps!r}, {args.guidance!r} are not allowed; "
            "expected an integer >= 1 and a number >= 0"
        )
    base, f1 = sample_files(
        args.controlnet,
        args.condition,
        args.prompt,
        args.out,
        weights=args.weights,
        base=args.base,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        scale=args.scale,
    )
    print(f"wrote {args.out} (each condition above its sample; base {base})")
    print(
        "edge F1 of each sample's Canny edges against its condition (for edge-like "
        "conditions): " + ", ".join(f"{v:.3f}" for v in f1.tolist())
    )


def run_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench as bench

    if args.threads is not None and args.threads < 1:
        raise SettingError(f"threads: {args.threads!r} is not allowed; expected an integer >= 1")
    argv = sys.argv[1:] if args.argv is None else args.argv
    for name, path in bench(
        "quick" if args.quick else "full",
        args.out,
        args.threads,
        tuple(args.suites),
        command=" ".join(["python", "-m", "cnet", *argv]),
    ).items():
        print(f"{name}: wrote {path}")


def _add_sample_and_bench(sub) -> None:
    sample = sub.add_parser(
        "sample",
        help="generate from a run's checkpoint or a shipped "
        "ControlNet, conditions above samples in one PNG",
    )
    sample.add_argument("--controlnet", required=True, help="a run folder or a shipped one")
    sample.add_argument("--condition", required=True, nargs="+", help="condition image files")
    sample.add_argument(
        "--prompt", required=True, nargs="+", help="one prompt, or one per condition"
    )
    sample.add_argument(
        "--base", default=None, help="default: the base the ControlNet was trained on"
    )
    sample.add_argument("--out", default="sample.png")
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--guidance", type=float, default=3.0)
    sample.add_argument("--scale", type=float, default=1.0, help="control scale")
    sample.add_argument("--seed", type=int, default=0)
    _add_weights_flag(sample)
    bench = sub.add_parser("bench", help="speed and memory figures, as ratios measured in one run")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery")
    bench.add_argument(
        "--out",
        default="runs/bench",
        help="where the JSON and figures go (bench/results: the committed ones)",
    )
    bench.add_argument("--threads", type=int, default=None)
    from .bench import SUITES

    bench.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)


def _add_ablate(sub) -> None:
    ablate = sub.add_parser(
        "ablate",
        help="the paper's ablations and the convergence evidence, several seeds each (notebook 07)",
    )
    ablate.add_argument(
        "--studies",
        nargs="+",
        default=None,
        help="default: all (seeds connections lite prompt_dropout data_size grad_accum long)",
    )
    ablate.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ablate.add_argument("--root", default="runs/ablate", help="where the runs go")
    ablate.add_argument(
        "--results",
        default="runs/ablate/ablations.json",
        help="the summary JSON (figures/07_ablations.json: the shipped one)",
    )
    ablate.add_argument(
        "--figures", action="store_true", help="write the figures beside --results as 07_*.png"
    )
    ablate.add_argument(
        "--variants", nargs="+", default=None, help="only train these variants (no summary)"
    )
    ablate.add_argument("--no_train", action="store_true", help="summarize finished runs only")
    ablate.add_argument("--no_summary", action="store_true", help="train only")
    ablate.add_argument(
        "--step_time_from",
        default=None,
        help="take the step times from this earlier summary instead of timing the step again",
    )


def _add_compare_methods(sub) -> None:
    from .experiments.methods import METHODS_COMPARED, SEEDS

    add = sub.add_parser(
        "compare-methods", help="ControlNet and its successors side by side (notebook 08)"
    ).add_argument
    add("--methods", nargs="+", default=list(METHODS_COMPARED), choices=list(METHODS_COMPARED))
    add("--seeds", nargs="+", type=int, default=list(SEEDS))
    add("--root", default="runs/methods", help="where the runs go")
    add("--results", default="runs/methods/methods.json", help="figures/08_methods.json: shipped")
    add("--figures", action="store_true", help="write the figures beside --results as 08_*.png")
    add("--no_train", action="store_true", help="summarize finished runs only")


def _add_weights_flag(command) -> None:
    command.add_argument(
        "--weights",
        choices=("latest", "best"),
        default="latest",
        help="a training run's last checkpoint, or its best evaluation's "
        "weights (best.safetensors): %(default)s",
    )


def _add_recipe(sub) -> None:
    recipe = sub.add_parser(
        "recipe",
        help="the recipe study: learning rate, batch and "
        "timestep sampling over seeds, each run continued "
        "to twice its steps",
    )
    recipe.add_argument("--recipes", nargs="+", default=None, help="default: all")
    recipe.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    recipe.add_argument("--root", help="where the runs go: runs/recipe (or runs/full-check)")
    recipe.add_argument("--results", help="<root>/recipe_study.json (or full_study.json)")
    recipe.add_argument(
        "--check",
        action="store_true",
        help="train the recipe the finished study chooses on --check_seeds "
        "into --check_root, and report it beside the study",
    )
    recipe.add_argument("--check_seeds", nargs="+", type=int, default=list(range(10)))
    recipe.add_argument("--check_root", default="runs/recipe/check")
    recipe.add_argument(
        "--figures",
        action="store_true",
        help="draw recipe_study.png (and recipe_check.png), or <profile>_check.png, by --results",
    )
    recipe.add_argument(
        "--earlier",
        default=None,
        help="a summary JSON whose recipes are kept where their runs are not in "
        "--root / --check_root (e.g. figures/recipe_study.json)",
    )
    recipe.add_argument("--no_train", action="store_true", help="summarize finished runs only")
    recipe.add_argument("--no_summary", action="store_true", help="train only")
    recipe.add_argument("--no_continuation", action="store_true", help="not on to 2x the steps")
    recipe.add_argument("--profile", choices=("full",), help="check the full profile over --seeds")


def _add_measurements(sub) -> None:
    for name, help_text, samples in (
        (
            "evaluate",
            "a ControlNet against the base and the VAE's ceiling, on the same "
            "evaluation conditions",
            200,
        ),
        (
            "control",
            "notebook 06's measurements of a Fill ControlNet: strength, timing, "
            "residuals during sampling, the empty prompt, two ControlNets at once, "
            "transfer to a fine-tune",
            64,
        ),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("folder", help="a shipped ControlNet, e.g. models/controlnet-fill")
        command.add_argument(
            "--base",
            default=None if name == "evaluate" else TrainConfig.base,
            help="the base it controls (evaluate's default: the one its run.json names)",
        )
        command.add_argument("--samples", type=int, default=samples)
        command.add_argument(
            "--profile",
            choices=sorted(PROFILES),  # control: notebook 06's
            default="quick" if name == "control" else "full",
            help="whose evaluation sampler (steps, guidance): %(default)s",
        )
        command.add_argument("--threads", type=int, default=1)
        if name == "evaluate":
            _add_weights_flag(command)
            command.add_argument(
                "--seed",
                type=int,
                default=0,
                help="whose evaluation conditions: a training run of this seed evaluates on "
                "the first --samples of them",
            )
        if name == "control":
            command.add_argument(
                "--segmentation",
                default="models/controlnet-segmentation",
                help="a second ControlNet, composed with the first",
            )
            command.add_argument(
                "--fine_tune",
                default="models/miniature-sd-cycled",
                help="a fine-tune of the base, for the transfer measurement",
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cnet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lessons = sub.add_parser("lessons", help="run the math lessons headless, write figures")
    lessons.add_argument("--seed", type=int, default=0)
    lessons.add_argument("--steps", type=int, default=30)
    for name, help_text, skip in (
        ("train", "train a ControlNet on the miniature base", ()),
        ("compare", "runs that differ in one setting, side by side", ("out",)),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument(
            "--profile",
            choices=sorted(PROFILES),
            help="quick (CPU, minutes) or full (the shipped run); default for "
            "train: full on CUDA, quick otherwise; for compare: quick",
        )
        add_flags(command, TrainConfig, skip=skip)
    sub.choices["train"].add_argument(
        "--figures",
        default=None,
        metavar="DIR",
        help="write the run's figures to DIR as 05_<profile>_*.png instead of <out>/figures "
        "(e.g. --figures figures to replace the repository's)",
    )
    compare = sub.choices["compare"]
    compare.add_argument("--knob", required=True, help="the TrainConfig setting to vary")
    compare.add_argument("--values", required=True, nargs="+", help="its values, one run each")
    compare.add_argument("--label", default="", help="added to the figure's title")
    _add_ablate(sub)
    _add_recipe(sub)
    _add_compare_methods(sub)
    course = sub.add_parser(
        "course",
        help="stamp the repository's URL into the notebooks' "
        "setup cells and the README's Colab links",
    )
    course.add_argument(
        "--repo", required=True, help="the repository's git URL, e.g. https://github.com/you/cnet"
    )
    course.add_argument("--branch", default="main", help="the branch Colab links open")
    course.add_argument("--root", default=".", help="the clone to stamp (default: here)")
    export = sub.add_parser("export", help="ship a finished run as a diffusers ControlNetModel")
    export.add_argument("run", help="the run folder (holds checkpoint.safetensors)")
    export.add_argument("out", help="the folder to ship, e.g. models/controlnet-fill")
    export.add_argument("--samples_kept", type=int, default=8)
    export.add_argument(
        "--half", action="store_true", help="store the weights in half precision (half the bytes)"
    )
    _add_weights_flag(export)
    _add_sample_and_bench(sub)
    _add_measurements(sub)
    return parser


COMMANDS = {
    "lessons": run_lessons,
    "train": run_train,
    "compare": run_compare,
    "ablate": run_ablate,
    "compare-methods": run_compare_methods,
    "recipe": run_recipe,
    "course": run_course,
    "export": run_export,
    "evaluate": run_evaluate,
    "control": run_control,
    "bench": run_bench,
    "sample": run_sample,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv  # recorded with a measurement, as typed
    try:
        COMMANDS[args.command](args)
    except (SettingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
