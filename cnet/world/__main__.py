"""Command line of the miniature world.

    python -m cnet.world pretrain --profile quick|full --out FOLDER [--run_dir DIR] [--key=value]
    python -m cnet.world evaluate --model FOLDER [--samples N] [--steps S] [--guidance G]

``pretrain`` takes every field of ``cnet.world.pretrain.Settings`` as ``--field=value``, applied
on top of the profile (nanoGPT-style: plain values, overridable).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _pretrain(argv: list[str]) -> None:
    from .pretrain import PROFILES, Settings, pretrain

    parser = argparse.ArgumentParser(prog="python -m cnet.world pretrain")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pipeline")
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="checkpoints and log (default: runs/<out's name>); resumes from it")
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=None)
    args = parser.parse_args(argv)
    values = {**PROFILES[args.profile]}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                   if getattr(args, f.name) is not None})
    settings = Settings(**values)
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
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
