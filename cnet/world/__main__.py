"""Command line of the miniature world.

    python -m cnet.world pretrain --profile quick|full --out FOLDER [--run_dir DIR] [--field VALUE]
    python -m cnet.world evaluate --model FOLDER [--samples N] [--profile full] [--seed S]

``pretrain`` takes every field of ``cnet.world.pretrain.Settings`` as ``--field VALUE``, applied
on top of the profile (nanoGPT-style: plain values, overridable). A bad value is refused with one
line naming the setting, before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..train.config import SettingError, add_flags, settings_from_flags


def _pretrain(argv: list[str]) -> None:
    from .pretrain import PROFILES, Settings, pretrain

    parser = argparse.ArgumentParser(prog="python -m cnet.world pretrain")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pipeline")
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="checkpoints and log (default: runs/<out's name>); resumes from it")
    add_flags(parser, Settings)
    args = parser.parse_args(argv)
    settings = settings_from_flags(Settings, args, PROFILES[args.profile]).check()
    run_dir = args.run_dir or Path("runs") / args.out.name
    pretrain(settings, args.out, run_dir, profile=args.profile,
             command=["python", "-m", "cnet.world", "pretrain", *argv])


def _evaluate(argv: list[str]) -> None:
    from .evaluate import main

    main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"pretrain": _pretrain, "evaluate": _evaluate}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: python -m cnet.world {{{','.join(commands)}}} ... (see --help)")
    try:
        commands[argv[0]](argv[1:])
    except (SettingError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
