"""Command line of the miniature world: ``python -m cnet.world <command>``; ``-h`` lists flags.

    python -m cnet.world pretrain --profile quick|full --out FOLDER [--run_dir DIR] [--field VALUE]
    python -m cnet.world finetune --profile quick|full --out FOLDER [--base FOLDER] [--style S]
    python -m cnet.world refine-decoder --profile quick|full --seeds N [N ...] --root DIR
                                        [--base FOLDER] [--results FILE [--overwrite]]
                                        [--samples N]
    python -m cnet.world fit-latents [--samples N] [--steps N [N ...]] [--results FILE]
    python -m cnet.world evaluate --model FOLDER [--samples N] [--profile full] [--seed S]
    python -m cnet.world export --layout tutorial|imagefolder --out FOLDER [--samples N]
                                [--task fill|canny|...] [--resolution R]

``pretrain``, ``finetune`` and ``refine-decoder`` take every field of
``cnet.world.pretrain.Settings`` as ``--field VALUE``, applied on top of the profile
(nanoGPT-style: plain values, overridable).
This module parses and dispatches; the work is in the modules it names. A bad value is refused
with one line naming the setting, before any work starts, as ``python -m cnet`` refuses it
(``error: ...`` on stderr, exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..settings import SettingError, add_flags, settings_from_flags
from .data import TASKS
from .export import LAYOUTS
from .metrics import SAMPLERS

if TYPE_CHECKING:
    from .pretrain import Settings


def _training_profiles(name: str) -> dict:
    """The profiles of ``pretrain`` or ``finetune``: imported only when that command runs, since
    pretraining's modules load diffusers, transformers and accelerate."""
    if name == "pretrain":
        from .pretrain import PROFILES

        return PROFILES
    if name == "refine-decoder":
        from .decoder import REFINE_PROFILES

        return REFINE_PROFILES
    from .finetune import FINETUNE_PROFILES

    return FINETUNE_PROFILES


def _settings(args: argparse.Namespace, profiles: dict) -> tuple[Settings, Path]:
    """The checked settings (profile, then flags) and the run folder."""
    from .pretrain import Settings

    settings = settings_from_flags(Settings, args, profiles[args.profile]).check()
    return settings, args.run_dir or Path("runs") / args.out.name


def _pretrain(args: argparse.Namespace, argv: list[str]) -> None:
    from .pretrain import pretrain

    settings, run_dir = _settings(args, _training_profiles("pretrain"))
    pretrain(settings, args.out, run_dir, profile=args.profile, command=_command(argv))


def _finetune(args: argparse.Namespace, argv: list[str]) -> None:
    from .finetune import finetune

    settings, run_dir = _settings(args, _training_profiles("finetune"))
    if not (args.base / "model_index.json").exists():
        raise FileNotFoundError(f"--base: no diffusers pipeline folder at {args.base}")
    finetune(args.base, settings, args.out, run_dir, command=_command(argv))


def _refuse_base_and_results(args: argparse.Namespace) -> None:
    """A study's ``--base`` must be a pipeline folder, and its ``--results`` new unless
    ``--overwrite`` says to replace it."""
    if not (args.base / "model_index.json").exists():
        raise FileNotFoundError(f"--base: no diffusers pipeline folder at {args.base}")
    if args.overwrite and args.results is None:
        raise SettingError("overwrite: given without --results, which it would replace")
    if args.results is not None and args.results.exists() and not args.overwrite:
        raise SettingError(f"results: {args.results} exists; pass --overwrite")


def _write_results(args: argparse.Namespace, result: dict) -> None:
    """A study's record, printed, and written whole or not at all to ``--results`` if given."""
    import json

    text = json.dumps(result, indent=2) + "\n"
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        partial = args.results.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(args.results)
    print(text, end="")


def _refine_decoder(args: argparse.Namespace, argv: list[str]) -> None:
    from .decoder import decoder_study
    from .pretrain import Settings

    settings = settings_from_flags(
        Settings, args, _training_profiles("refine-decoder")[args.profile]
    ).check()
    if args.seed is not None:
        raise SettingError(f"seed: {args.seed!r} is not allowed here; the seeds are --seeds")
    if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        raise SettingError(
            f"seeds: {args.seeds!r} is not allowed; expected different integers >= 0"
        )
    if not 2 <= args.samples <= 1000:
        raise SettingError(
            f"samples: {args.samples!r} is not allowed; expected an integer from 2 to 1000"
        )
    _refuse_base_and_results(args)
    command = " ".join(_command(argv))
    result = decoder_study(args.base, settings, args.seeds, args.root, args.samples, command)
    _write_results(args, result)


def _fit_latents(args: argparse.Namespace, argv: list[str]) -> None:
    import time

    import torch

    from .decoder import FIT_LR, fitted_latents_study
    from .model import load_pipeline
    from .pretrain import cpu_description

    lr = FIT_LR if args.lr is None else args.lr
    if not 2 <= args.samples <= 1000:
        raise SettingError(
            f"samples: {args.samples!r} is not allowed; expected an integer from 2 to 1000"
        )
    if min(args.steps) < 0:
        raise SettingError(f"steps: {args.steps!r} is not allowed; expected integers >= 0")
    if not lr > 0:
        raise SettingError(f"lr: {lr!r} is not allowed; expected a number > 0")
    if args.threads < 1:
        raise SettingError(f"threads: {args.threads!r} is not allowed; expected an integer >= 1")
    _refuse_base_and_results(args)
    torch.set_num_threads(args.threads)
    started = time.time()
    study = fitted_latents_study(load_pipeline(args.base), args.samples, tuple(args.steps), lr)
    result = {
        "command": " ".join(_command(argv)),
        "base": str(args.base),
        "device": cpu_description(args.threads),
        "wall_time_s": round(time.time() - started, 1),
        **study,
    }
    _write_results(args, result)


def _evaluate(args: argparse.Namespace, argv: list[str]) -> None:
    import json

    import torch

    from .evaluation import evaluate_base

    if not 2 <= args.samples <= 1000:
        raise SettingError(
            f"samples: {args.samples!r} is not allowed; expected an integer from 2 to 1000"
        )
    if args.threads < 1:
        raise SettingError(f"threads: {args.threads!r} is not allowed; expected an integer >= 1")
    if args.seed < 0:
        raise SettingError(f"seed: {args.seed!r} is not allowed; expected an integer >= 0")
    torch.set_num_threads(args.threads)
    command = " ".join(_command(argv))
    result = evaluate_base(args.model, args.samples, args.profile, args.seed, command)
    print(json.dumps(result, indent=2))


def _export(args: argparse.Namespace, argv: list[str]) -> None:
    from .export import export_folder

    if args.samples < 1:
        raise SettingError(f"samples: {args.samples!r} is not allowed; expected an integer >= 1")
    try:
        out = export_folder(
            args.out, args.layout, args.samples, args.task, args.resolution, args.seed
        )
    except (ValueError, FileExistsError) as error:
        raise SettingError(str(error)) from None
    print(f"wrote {args.samples} pairs to {out} ({args.layout} layout)")


def _command(argv: list[str]) -> list[str]:
    """The command as typed, recorded with what it makes."""
    return ["python", "-m", "cnet.world", *argv]


def _parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``chosen``: the command on the line (argv[0]), whose flags it needs."""
    parser = argparse.ArgumentParser(prog="python -m cnet.world")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("pretrain", "pretrain the miniature Stable Diffusion (VAE, U-Net, decoder)"),
        ("finetune", "fine-tune a base's U-Net to another style"),
        ("refine-decoder", "refine a base's VAE decoder alone, over seeds, and measure its specks"),
    ):
        command = sub.add_parser(name, help=help_text)
        if name != chosen:  # only the command being run reads its flags
            continue
        from .pretrain import Settings

        command.add_argument("--profile", choices=sorted(_training_profiles(name)), default="quick")
        if name == "refine-decoder":
            command.add_argument("--seeds", type=int, nargs="+", required=True)
            command.add_argument(
                "--root", type=Path, required=True, help="run folders <root>/seed-<n>; resumed"
            )
            command.add_argument("--results", type=Path, default=None, help="JSON to write")
            command.add_argument("--overwrite", action="store_true", help="replace --results")
            command.add_argument("--samples", type=int, default=200)
        else:
            command.add_argument("--out", type=Path, required=True, help="folder for the pipeline")
            command.add_argument(
                "--run_dir",
                type=Path,
                default=None,
                help="checkpoints and log (default: runs/<out's name>); resumes from it",
            )
        if name != "pretrain":
            command.add_argument(
                "--base",
                type=Path,
                default=Path("models/miniature-sd"),
                help="the pipeline folder to fine-tune or refine",
            )
        add_flags(command, Settings)
    evaluate = sub.add_parser(
        "evaluate", help="the base alone on the evaluation split's prompts, exactly measured"
    )
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--samples", type=int, default=200)
    evaluate.add_argument(
        "--profile",
        choices=sorted(SAMPLERS),
        default="full",
        help="whose evaluation sampler to sample with (steps, guidance)",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--threads", type=int, default=1)
    fit = sub.add_parser(
        "fit-latents",
        help="fit latents to images through the base's decoder, and measure its specks",
    )
    fit.add_argument("--base", type=Path, default=Path("models/miniature-sd"))
    fit.add_argument("--samples", type=int, default=200)
    fit.add_argument(
        "--steps", type=int, nargs="+", default=[0, 25, 50, 100, 200], help="when to measure"
    )
    fit.add_argument(
        "--lr", type=float, default=None, help="Adam's learning rate (default: decoder.FIT_LR)"
    )
    fit.add_argument("--results", type=Path, default=None, help="JSON to write")
    fit.add_argument("--overwrite", action="store_true", help="replace --results")
    fit.add_argument("--threads", type=int, default=1)
    export = sub.add_parser("export", help="the world's pairs as a dataset folder")
    export.add_argument("--layout", choices=LAYOUTS, default="tutorial")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--samples", type=int, default=1000)
    export.add_argument("--task", choices=TASKS, default="fill")
    export.add_argument("--resolution", type=int, default=64)
    export.add_argument("--seed", type=int, default=0)
    return parser


COMMANDS = {
    "pretrain": _pretrain,
    "finetune": _finetune,
    "refine-decoder": _refine_decoder,
    "fit-latents": _fit_latents,
    "evaluate": _evaluate,
    "export": _export,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        COMMANDS[args.command](args, argv)
    except (SettingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
