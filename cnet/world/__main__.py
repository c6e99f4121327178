"""Command line of the miniature world.

    python -m cnet.world pretrain --profile quick|full --out FOLDER [--run_dir DIR] [--field VALUE]
    python -m cnet.world finetune --profile quick|full --out FOLDER [--base FOLDER] [--style S]
    python -m cnet.world evaluate --model FOLDER [--samples N] [--profile full] [--seed S]
    python -m cnet.world export --layout tutorial|imagefolder --out FOLDER [--samples N]
                                [--task fill|canny|...] [--resolution R]

``pretrain`` and ``finetune`` take every field of ``cnet.world.pretrain.Settings`` as
``--field VALUE``, applied on top of the profile (nanoGPT-style: plain values, overridable). A
bad value is refused with one line naming the setting, before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..settings import SettingError, add_flags, settings_from_flags


def _parse(command: str, profiles: dict, argv: list[str], extra=None):
    """``--profile``, ``--out``, ``--run_dir`` and every ``Settings`` field as a flag; returns the
    parsed arguments, the checked settings (profile, then flags) and the run folder."""
    from .pretrain import Settings

    parser = argparse.ArgumentParser(prog=f"python -m cnet.world {command}")
    parser.add_argument("--profile", choices=sorted(profiles), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pipeline")
    parser.add_argument(
        "--run_dir",
        type=Path,
        default=None,
        help="checkpoints and log (default: runs/<out's name>); resumes from it",
    )
    if extra is not None:
        extra(parser)
    add_flags(parser, Settings)
    args = parser.parse_args(argv)
    settings = settings_from_flags(Settings, args, profiles[args.profile]).check()
    return args, settings, args.run_dir or Path("runs") / args.out.name


def _pretrain(argv: list[str]) -> None:
    from .pretrain import PROFILES, pretrain

    args, settings, run_dir = _parse("pretrain", PROFILES, argv)
    pretrain(
        settings,
        args.out,
        run_dir,
        profile=args.profile,
        command=["python", "-m", "cnet.world", "pretrain", *argv],
    )


def _finetune(argv: list[str]) -> None:
    from .finetune import FINETUNE_PROFILES, finetune

    def base_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--base",
            type=Path,
            default=Path("models/miniature-sd"),
            help="the pipeline folder to fine-tune",
        )

    args, settings, run_dir = _parse("finetune", FINETUNE_PROFILES, argv, base_flag)
    if not (args.base / "model_index.json").exists():
        raise FileNotFoundError(f"--base: no diffusers pipeline folder at {args.base}")
    finetune(
        args.base,
        settings,
        args.out,
        run_dir,
        command=["python", "-m", "cnet.world", "finetune", *argv],
    )


def _evaluate(argv: list[str]) -> None:
    from .evaluate import main

    main(argv)


def _export(argv: list[str]) -> None:
    from .data import TASKS
    from .export import LAYOUTS, export_folder

    parser = argparse.ArgumentParser(prog="python -m cnet.world export")
    parser.add_argument("--layout", choices=LAYOUTS, default="tutorial")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--task", choices=TASKS, default="fill")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1:
        raise SettingError(f"samples: {args.samples!r} is not allowed; expected an integer >= 1")
    try:
        out = export_folder(
            args.out, args.layout, args.samples, args.task, args.resolution, args.seed
        )
    except (ValueError, FileExistsError) as error:
        raise SettingError(str(error)) from None
    print(f"wrote {args.samples} pairs to {out} ({args.layout} layout)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "pretrain": _pretrain,
        "finetune": _finetune,
        "evaluate": _evaluate,
        "export": _export,
    }
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: python -m cnet.world {{{','.join(commands)}}} ... (see --help)")
    try:
        commands[argv[0]](argv[1:])
    except (SettingError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
