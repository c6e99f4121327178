"""The profiles as they stand, checked over seeds by the recipe study's rules
(:mod:`cnet.experiments.recipe`): every seed trained to the profile's steps, then continued to
twice them; onsets k of n, collapses at 2×, the spread of the final fidelity.

    python -m cnet recipe --profile full --seeds 0 1 2 3 4 --root runs/full-check \\
        --results figures/full_check.json --figures
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..train.config import PROFILES, SettingError, TrainConfig
from ..train.loop import train
from ..train.runs import run_finished
from .recipe import (
    COLLAPSE_SHARE,
    ONSET_MARGIN,
    aggregate_seeds,
    copy_run,
    measure_run_pair,
)

__all__ = ["PROFILE_CHECK_SEEDS", "profile_check", "profile_command", "profile_config"]

#: The seeds the full profile is checked on (``python -m cnet recipe --profile full``).
PROFILE_CHECK_SEEDS = (0, 1, 2, 3, 4)


def profile_config(
    profile: str, seed: int, root: str | Path = "runs/full-check", continued: bool = False
) -> TrainConfig:
    """A run of ``profile`` as ``python -m cnet train --profile <profile>`` makes it, for
    ``seed``, to the profile's steps or (``continued``) twice them, in ``<root>/seed<s>``
    (``-2x``). The profile's rate is a function of the step alone, so the longer run is the
    shorter one continued."""
    if profile not in PROFILES:
        raise SettingError(
            f"profile: {profile!r} is not allowed; expected one of " + ", ".join(PROFILES)
        )
    steps = PROFILES[profile].get("steps", TrainConfig.steps) * (2 if continued else 1)
    out = f"{root}/seed{seed}" + ("-2x" if continued else "")
    return TrainConfig(**{**PROFILES[profile], "steps": steps, "seed": seed, "out": out}).check()


def profile_command(
    profile: str, seed: int, root: str | Path = "runs/full-check", continued: bool = False
) -> str:
    """The ``python -m cnet train`` line that makes the same run."""
    config = profile_config(profile, seed, root, continued)
    longer = f" --steps {config.steps}" if continued else ""
    return f"python -m cnet train --profile {profile} --seed {seed} --out {config.out}{longer}"


def profile_check(
    profile: str,
    seeds: Sequence[int] = PROFILE_CHECK_SEEDS,
    root: str | Path = "runs/full-check",
    train_runs: bool = True,
    command: str = "",
    continued: bool = True,
) -> dict:
    """``profile`` as it stands over ``seeds`` (``python -m cnet recipe --profile full``): each
    seed trained to the profile's steps, then (unless not ``continued``) every seed continued
    to twice them (nothing trained unless ``train_runs``), measured as the study measures a
    recipe (:func:`measure_run_pair`, :func:`aggregate_seeds`). A seed whose longer run was
    made from scratch has no separate run to the budget; its budget's measures come from the
    longer run's first half."""
    profile_config(profile, 0, root)  # the name checked before any work
    if not seeds or any(s < 0 for s in seeds):
        raise SettingError(f"seeds: {list(seeds)!r} is not allowed; expected integers >= 0")
    pairs = {
        s: (profile_config(profile, s, root), profile_config(profile, s, root, True)) for s in seeds
    }
    if train_runs:  # every seed's onset first, then the continuations
        for first, longer in pairs.values():
            if not Path(longer.out).exists():  # else the longer run holds the budget's
                print(f"--- {first.out}")
                train(first, profile=profile)
        for first, longer in pairs.values() if continued else ():
            if not Path(longer.out).exists():
                copy_run(first.out, longer.out)
            print(f"--- {longer.out}")
            train(longer, profile=profile)
    runs = [
        measure_run_pair(
            first, longer, [profile_command(profile, s, root, c) for c in (False, True)]
        )
        for s, (first, longer) in pairs.items()
        if run_finished(first) or run_finished(longer)
    ]
    result = {
        "command": command,
        "profile": profile,
        "settings": {k: v for k, v in PROFILES[profile].items() if k != "out"},
        "collapse_share": COLLAPSE_SHARE,
        "onset_margin": ONSET_MARGIN,
        "not_run": [s for s, (f, g) in pairs.items() if not (run_finished(f) or run_finished(g))],
    }
    return result | (aggregate_seeds(runs) if runs else {"n": 0, "runs": []})
