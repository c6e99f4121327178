r"""The recipe study: which training settings make *every* seed follow its condition.

    python -m cnet recipe                                   # every recipe, seeds 0-4
    python -m cnet recipe --recipes b32-lr2e-3-cubic --seeds 5 6 7 8 9
    OMP_NUM_THREADS=1 python -m cnet recipe --seeds 0 1 2   # the same runs on one thread

A recipe is a setting of the ordinary training loop (:func:`cnet.train.train`): learning rate
and its schedule, batch size and timestep sampling on top of TrainConfig's defaults.
Every recipe gets the same budget of training samples (:data:`BUDGET_SAMPLES`: steps × batch
size), so a recipe with a larger batch takes fewer steps, unless it names its own ``steps`` (a
longer budget, which its wall time then shows); each is run for the same seeds, a seed
setting everything random in a run (the condition encoder's weights, every batch, its training
and evaluation sets), and then **continued to twice its steps** (the same run resumed: the
learning rate is a function of the step alone, :func:`cnet.train.optim.lr_factor`, so it is bit
for bit the run that was asked for 2× the steps from the start).

Each run is measured from its log (:func:`measure_recipe_run`): the onset (the first
evaluation more than 0.05 above its step-0 fidelity, which is the locked base's, at that
evaluation and the next: :func:`cnet.train.convergence.onset_step`), the final and best
fidelity at the budget and at 2×, and whether it **collapsed** in the continuation: its
final fidelity below 0.9 × the best it reached (:data:`COLLAPSE_SHARE`), and whether the
loop's collapse alerts would have fired on it. :func:`summarize_recipes`
gathers them, k of n seeds and the spread, into one JSON (``figures/recipe_study.json``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..train.config import PROFILES, SettingError, TrainConfig
from ..train.convergence import (
    LOSS_WINDOW,
    detect_sudden_convergence,
    fidelity_collapsed,
    loss_spiked,
    onset_step,
)
from ..train.loop import train
from ..train.runs import read_log, run_finished

__all__ = [
    "BUDGET_SAMPLES",
    "COLLAPSE_SHARE",
    "RECIPES",
    "RECIPE_SEEDS",
    "aggregate_seeds",
    "check_earlier",
    "copy_run",
    "choose",
    "collapsed",
    "keep_earlier",
    "measure_recipe_run",
    "measure_run_pair",
    "read_study",
    "recipe_command",
    "recipe_config",
    "recipe_study",
    "run_recipes",
    "summarize_recipes",
]

#: Training samples per run (steps × batch size): 400 steps of 32, about 3.5 minutes on 2 cores.
BUDGET_SAMPLES = 12_800
RECIPE_SEEDS = (0, 1, 2, 3, 4)
#: Settings every recipe shares, on top of TrainConfig's defaults.
RECIPE_SETTINGS: dict = {"eval_every": 50}
#: Each recipe names all it sets, so that none depends on what the profiles say today.
RECIPES: dict[str, dict] = {
    # the quick profile until this study (lr 2e-3, batch 16), run to the same budget
    "b16-lr2e-3": {"batch_size": 16, "lr": 2e-3, "timesteps": "uniform"},
    "b32-lr2e-3": {"batch_size": 32, "lr": 2e-3, "timesteps": "uniform"},
    "b32-lr2e-3-cubic": {"batch_size": 32, "lr": 2e-3, "timesteps": "cubic"},
    "b32-lr1e-3-cubic": {"batch_size": 32, "lr": 1e-3, "timesteps": "cubic"},
    # the last quarter of the budget decays to a tenth of the rate, which it keeps after
    "b32-lr2e-3-cubic-decay": {
        "batch_size": 32,
        "lr": 2e-3,
        "timesteps": "cubic",
        "lr_decay_start": 300,
        "lr_decay_steps": 100,
    },
    # a higher peak rate for an earlier onset, held steady by the same decay
    "b32-lr3e-3-cubic-decay": {
        "batch_size": 32,
        "lr": 3e-3,
        "timesteps": "cubic",
        "lr_decay_start": 300,
        "lr_decay_steps": 100,
    },
    # the pretrained copy (Θc) at a quarter of the rate of the parts that start from scratch (the
    # condition encoder and the zero convolutions, at twice b32-lr2e-3-cubic's rate), decaying
    # over the last quarter of the budget to a tenth of both rates
    "b32-lr4e-3-copy1e-3-cubic-decay": {
        "batch_size": 32,
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "timesteps": "cubic",
        "lr_decay_start": 300,
        "lr_decay_steps": 100,
    },
    # a gentler rate for the parts that start from scratch (4e-3 diverged on one seed of ten), the
    # copy at half of it
    "b32-lr3e-3-copy1.5e-3-cubic-decay": {
        "batch_size": 32,
        "lr": 3e-3,
        "copy_lr_scale": 0.5,
        "timesteps": "cubic",
        "lr_decay_start": 300,
        "lr_decay_steps": 100,
    },
    # b32-lr4e-3-copy1e-3-cubic-decay with the update's gradient clipped to a norm of 0.1, about
    # three times its usual size: its one divergence began with gradient spikes (0.2 to 8)
    "b32-lr4e-3-copy1e-3-cubic-decay-clip0.1": {
        "batch_size": 32,
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "timesteps": "cubic",
        "lr_decay_start": 300,
        "lr_decay_steps": 100,
        "max_grad_norm": 0.1,
    },
    # the clipped recipe with a longer budget (520 updates: its median final fidelity was still
    # rising at 400), the rate held until the last hundred, and channels-last memory, which makes
    # the step 0.88x as long (bench/README, section 7): about a minute more on 2 cores
    "b32-520-lr4e-3-copy1e-3-cubic-decay-clip0.1-cl": {
        "batch_size": 32,
        "steps": 520,
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "timesteps": "cubic",
        "lr_decay_start": 420,
        "lr_decay_steps": 100,
        "max_grad_norm": 0.1,
        "channels_last": True,
    },
    # the same with 640 updates (the rate held until the last hundred): at 520 the median final
    # fidelity over ten seeds was 0.849, and the continued runs were still rising
    "b32-640-lr4e-3-copy1e-3-cubic-decay-clip0.1-cl": {
        "batch_size": 32,
        "steps": 640,
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "timesteps": "cubic",
        "lr_decay_start": 540,
        "lr_decay_steps": 100,
        "max_grad_norm": 0.1,
        "channels_last": True,
    },
    # the 520-update recipe with its decay over the last 200 updates instead of 100: at update
    # 500, 80 updates into its decay, the 520 recipe was above the 640 one (whose rate was still
    # held) on 10 of 10 seeds (median +0.022)
    "b32-520-lr4e-3-copy1e-3-cubic-decay200-clip0.1-cl": {
        "batch_size": 32,
        "steps": 520,
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "timesteps": "cubic",
        "lr_decay_start": 320,
        "lr_decay_steps": 200,
        "max_grad_norm": 0.1,
        "channels_last": True,
    },
    # 800 updates, the rate decaying over the last 300: every schedule of 400-640 updates ended
    # near a median of 0.85 (whatever the decay's length: over 100 or 200 updates, the finals
    # of 520-update runs were within 0.01 of each other on 10 of 10 seeds), while the quick
    # profile continued at its floor rate was still rising at update 600; the shipped full run
    # needed ~700 updates after its onset to pass 0.90
    "b32-800-lr4e-3-copy1e-3-cubic-decay300-clip0.1-cl": {
        "batch_size": 32,
        "steps": 800,
        "lr": 4e-3,
        "copy_lr_scale": 0.25,
        "timesteps": "cubic",
        "lr_decay_start": 500,
        "lr_decay_steps": 300,
        "max_grad_norm": 0.1,
        "channels_last": True,
    },
}
#: A continued run has collapsed where its final fidelity is below this share of its best.
COLLAPSE_SHARE = 0.9


def collapsed(fidelity: Sequence[float]) -> bool:
    """The run's last evaluation is below :data:`COLLAPSE_SHARE` × the best it reached."""
    return fidelity[-1] < COLLAPSE_SHARE * max(fidelity)


ONSET_MARGIN = 0.05


def recipe_config(
    recipe: str, seed: int, root: str | Path = "runs/recipe", continued: bool = False
) -> TrainConfig:
    """One run's settings: TrainConfig's defaults, the shared study settings, the recipe, the
    seed, and the budget's steps (twice them when ``continued``)."""
    if recipe not in RECIPES:
        raise SettingError(
            f"recipe: {recipe!r} is not allowed; expected one of " + ", ".join(RECIPES)
        )
    settings = {**RECIPE_SETTINGS, **RECIPES[recipe]}
    budget = settings.pop("steps", BUDGET_SAMPLES // settings["batch_size"])
    steps = budget * (2 if continued else 1)
    name = f"{recipe}-2x" if continued else recipe
    return TrainConfig(**settings, steps=steps, seed=seed, out=f"{root}/{name}/seed{seed}").check()


def recipe_command(
    recipe: str, seed: int, root: str | Path = "runs/recipe", continued: bool = False
) -> str:
    """The ``python -m cnet train`` line that makes the same run."""
    config = recipe_config(recipe, seed, root, continued)
    quick = TrainConfig(**PROFILES["quick"])
    flags = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(quick, f.name)
    }
    return "python -m cnet train --profile quick " + " ".join(
        f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()
    )


def train_recipe(
    recipe: str, seed: int, root: str | Path = "runs/recipe", continued: bool = False
) -> None:
    """Train one recipe's run to the budget, or (``continued``) continue it to 2×: a copy of
    its folder, resumed. Finished runs are left as they are; interrupted ones resume."""
    first = recipe_config(recipe, seed, root)
    if not continued:
        print(f"--- {first.out}")
        train(first, profile="recipe")
        return
    longer = recipe_config(recipe, seed, root, continued=True)
    if not Path(longer.out).exists():
        train_recipe(recipe, seed, root)  # finished first (left as it is if it is)
        copy_run(first.out, longer.out)
    print(f"--- {longer.out}")
    train(longer, profile="recipe")


def copy_run(folder: str | Path, to: str | Path) -> None:
    """A run's folder copied to ``to``, where its continuation resumes: staged beside it and
    moved into place whole, so an interrupted copy never leaves half a run (a stale stage from
    one is replaced)."""
    staging = Path(to).with_name(Path(to).name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging)
    staging.replace(to)


def run_recipes(
    recipes: Sequence[str],
    seeds: Sequence[int] = RECIPE_SEEDS,
    root: str | Path = "runs/recipe",
    continued: bool = True,
) -> None:
    """Every recipe's runs to the budget, seed by seed, then (unless not ``continued``) their
    continuations (so that the onsets of every seed are in before the longer runs start)."""
    for recipe in recipes:
        recipe_config(recipe, 0, root)  # every name checked before any work
    if not seeds or any(s < 0 for s in seeds):
        raise SettingError(f"seeds: {list(seeds)!r} is not allowed; expected integers >= 0")
    for longer in (False, True)[: 2 if continued else 1]:
        for seed in seeds:
            for recipe in recipes:
                train_recipe(recipe, seed, root, longer)


def choose(summary: dict) -> str:
    """The recipe the profile takes. Only a recipe continued to 2× (in the study or its check)
    can be chosen: whether it collapses must be known. Among those: the largest share of seeds
    with an onset, counted over every seed it ran on (the study's and the check's: the check is
    where a rarer miss shows), then the smallest share of collapses over every seed continued,
    then the highest median final fidelity on the check's seeds where it was checked (two
    threads, as the profiles run), else on the study's."""
    parts = [summary["recipes"], summary.get("check", {}).get("recipes", {})]
    names = list(dict.fromkeys(name for part in parts for name in part))

    def total(r: str, key: str) -> int:
        return sum(part[r][key] for part in parts if r in part)

    def collapse_share(r: str) -> float:
        return total(r, "collapses_2x") / total(r, "n_2x") if total(r, "n_2x") else 1.0

    def median_final(r: str) -> float:
        return (parts[1].get(r) or parts[0][r])["final_iou"]["median"]

    eligible = [r for r in names if total(r, "n_2x")] or names
    return max(
        eligible,
        key=lambda r: (total(r, "onsets") / total(r, "n"), -collapse_share(r), median_final(r)),
    )


def _caught(loss: list[float], iou: list[float]) -> bool:
    """Whether the loop's alerts (:func:`fidelity_collapsed`, :func:`loss_spiked`) fire at any
    point of this log: read back from the log, so runs logged before the alerts existed count
    the same way."""
    return any(fidelity_collapsed(iou[: i + 1]) for i in range(len(iou))) or any(
        loss_spiked(loss[: i + 1]) for i in range(4 * LOSS_WINDOW - 1, len(loss))
    )


def measure_recipe_run(recipe: str, seed: int, root: str | Path = "runs/recipe") -> dict:
    """What the study reports of one seed of one recipe (its run to the budget must have
    finished; the ``*_2x`` measures are None until its continuation has)."""
    first = recipe_config(recipe, seed, root)
    longer = recipe_config(recipe, seed, root, continued=True)
    commands = [recipe_command(recipe, seed, root, c) for c in (False, True)]
    return measure_run_pair(first, longer, commands)


def measure_run_pair(first: TrainConfig, longer: TrainConfig, commands: list[str]) -> dict:
    """One seed's run to the budget (``first``) and to twice it (``longer``, the same run
    continued): onset, final and best fidelity within the budget, read from the longer run's
    log once it has finished (its first half is the budget's run), and the ``*_2x`` measures
    (None until it has). ``first`` may be missing where ``longer`` ran from scratch (the same
    updates: the rate is a function of the step alone); its wall time is then None.
    ``commands``: the lines that make the two runs."""
    continued = run_finished(longer)
    log = read_log(Path(longer.out if continued else first.out))
    steps, iou = log.eval_steps, log.eval_iou
    has_first = run_finished(first)
    record = json.loads((Path(first.out if has_first else longer.out) / "run.json").read_text())
    budget = [i for i, s in enumerate(steps) if s <= first.steps]
    report = detect_sudden_convergence([steps[i] for i in budget], [iou[i] for i in budget])
    result = {
        "seed": first.seed,
        "steps": first.steps,
        "device": record["device_name"],
        "wall_time_s": record["wall_time_s"] if has_first else None,
        "onset": onset_step(
            [steps[i] for i in budget], [iou[i] for i in budget], margin=ONSET_MARGIN
        ),
        "step0_iou": iou[0],
        "final_iou": iou[budget[-1]],
        "best_iou": max(iou[i] for i in budget),
        "abruptness": report.abruptness,
        "sudden": report.sudden,
        "eval_steps": steps,
        "iou": iou,
        "commands": commands[:1] if has_first else [],
        "continued": continued,
        "wall_time_2x_s": None,
        "onset_2x": None,
        "final_iou_2x": None,
        "best_iou_2x": None,
        "collapsed_2x": None,
        "alert_2x": None,
    }
    if continued:
        best_2x = max(iou)
        result |= {
            "wall_time_2x_s": json.loads((Path(longer.out) / "run.json").read_text())[
                "wall_time_s"
            ],
            "onset_2x": onset_step(steps, iou, margin=ONSET_MARGIN),
            "final_iou_2x": iou[-1],
            "best_iou_2x": best_2x,
            "collapsed_2x": collapsed(iou),
            "alert_2x": _caught(log.loss, iou),
            "commands": result["commands"] + commands[1:],
        }
    return result


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    n = len(values)
    median = (values[(n - 1) // 2] + values[n // 2]) / 2
    return {"median": median, "min": values[0], "max": values[-1], "mean": sum(values) / n}


def summarize_recipes(
    recipes: Sequence[str],
    seeds: Sequence[int] = RECIPE_SEEDS,
    root: str | Path = "runs/recipe",
    command: str = "",
) -> dict:
    """Every seed of every recipe whose run to the budget has finished, and per recipe: onsets
    k of n, collapses at 2× k of those continued (``n_2x``), the spread of the final fidelity
    and the wall time."""
    result: dict = {
        "command": command,
        "budget_samples": BUDGET_SAMPLES,
        "settings": RECIPE_SETTINGS,
        "collapse_share": COLLAPSE_SHARE,
        "onset_margin": ONSET_MARGIN,
        "recipes": {},
    }
    result["not_run"] = []
    for recipe in recipes:
        runs = [
            measure_recipe_run(recipe, seed, root)
            for seed in seeds
            if run_finished(recipe_config(recipe, seed, root))
        ]
        if not runs:
            result["not_run"].append(recipe)
            continue
        result["recipes"][recipe] = {"settings": RECIPES[recipe], **aggregate_seeds(runs)}
    return result


def aggregate_seeds(runs: list[dict]) -> dict:
    """Seeds' runs (:func:`measure_run_pair`) gathered: onsets k of n, collapses at 2× k of
    those continued (``n_2x``), the spread of the onset step, the final fidelity and the wall
    time (over the runs that have one)."""
    onsets = [r["onset"] for r in runs if r["onset"] is not None]
    continued = [r for r in runs if r["continued"]]
    times = [r["wall_time_s"] for r in runs if r["wall_time_s"] is not None]
    return {
        "seeds": [r["seed"] for r in runs],
        "runs": runs,
        "n": len(runs),
        "onsets": len(onsets),
        "n_2x": len(continued),
        "collapses_2x": sum(r["collapsed_2x"] for r in continued),
        "alerts_2x": sum(r["alert_2x"] for r in continued),
        "onset_step": _spread(onsets) if onsets else None,
        "final_iou": _spread([r["final_iou"] for r in runs]),
        "final_iou_2x": _spread([r["final_iou_2x"] for r in continued]) if continued else None,
        "wall_time_s": _spread(times) if times else None,
    }


def read_study(path: str | Path) -> dict:
    """A recipe study's summary JSON (e.g. ``figures/recipe_study.json``); one line naming the
    setting if ``path`` is not one."""
    try:
        study = json.loads(Path(path).read_text())
        if all(key in study for key in ("recipes", "not_run", "command")):
            return study
    except (OSError, ValueError, TypeError):
        pass
    raise SettingError(
        f"earlier: {str(path)!r} is not allowed; expected a recipe study's summary JSON, "
        "e.g. figures/recipe_study.json"
    )


def check_earlier(earlier: dict) -> None:
    """Refuse (one line) an earlier summary measured under other rules than today's: its shared
    settings, budget, onset margin or collapse share, or any recipe's settings."""
    today = {
        "settings": RECIPE_SETTINGS,
        "budget_samples": BUDGET_SAMPLES,
        "onset_margin": ONSET_MARGIN,
        "collapse_share": COLLAPSE_SHARE,
    }
    for key, value in today.items():
        if key in earlier and earlier[key] != value:
            raise SettingError(
                f"earlier: its {key} is {earlier[key]!r}; expected today's, {value!r}"
            )
    for recipe, entry in earlier["recipes"].items():
        if RECIPES.get(recipe) != entry["settings"]:
            raise SettingError(
                f"earlier: recipe {recipe!r} was measured with {entry['settings']}; expected "
                f"its settings today, {RECIPES.get(recipe)}"
            )


def keep_earlier(summary: dict, earlier: dict | None) -> dict:
    """``summary`` with the recipes an ``earlier`` summary measured whose runs are not in this
    one's folders (a study goes on on another machine, or after its run folders are gone): each
    kept whole after the recipes measured now, its runs' commands rewritten to the lines that
    make them under today's quick profile (:func:`recipe_command`). A kept recipe must still have
    the settings it was measured with. The earlier summary's command goes on the list
    ``earlier_commands``."""
    if not earlier:
        return summary
    check_earlier(earlier)
    earlier = json.loads(json.dumps(earlier))  # the caller's copy left as it was
    kept = {r: v for r, v in earlier["recipes"].items() if r not in summary["recipes"]}
    for recipe, entry in kept.items():  # the lines that make each run under today's profile
        for run in entry["runs"]:
            out = run["commands"][0].split(" --out ")[1].split()[0]
            root = Path(out).parent.parent  # <root>/<recipe>/seed<k>
            run["commands"] = [recipe_command(recipe, run["seed"], root)] + (
                [recipe_command(recipe, run["seed"], root, True)] if run["continued"] else []
            )
    summary["recipes"] = {**kept, **summary["recipes"]}
    summary["not_run"] = [r for r in summary["not_run"] if r not in kept]
    summary["not_run"] += [r for r in earlier["not_run"] if r not in summary["recipes"]]
    summary["not_run"] = list(dict.fromkeys(summary["not_run"]))
    commands = earlier.get("earlier_commands", []) + [earlier["command"]]
    again = summary.get("command")  # a summary remade by its own command lists it once
    summary["earlier_commands"] = [c for c in dict.fromkeys(commands) if c and c != again]
    return summary


def recipe_study(
    recipes: Sequence[str],
    seeds: Sequence[int] = RECIPE_SEEDS,
    root: str | Path = "runs/recipe",
    train: bool = True,
    check_seeds: Sequence[int] | None = None,
    check_root: str | Path = "runs/recipe/check",
    command: str = "",
    continued: bool = True,
    earlier: dict | None = None,
) -> dict:
    """The study (``python -m cnet recipe``): train what is missing (unless not ``train``;
    without the continuations to 2× unless ``continued``),
    summarize, choose (:func:`choose`) and, with ``check_seeds``, run the chosen recipe on
    those seeds in ``check_root`` (e.g. on another number of threads) and report it beside,
    chosen first, with the other recipes checked there before (an earlier choice: the same
    seeds, so the two compare seed by seed). With an ``earlier`` summary, the recipes it
    measured whose runs are not here are kept from it (:func:`keep_earlier`), in the study and
    in its check, and the choice is made over both."""
    for part in (earlier, (earlier or {}).get("check")):
        if part:
            check_earlier(part)  # before any training
    if train and check_seeds is None:
        run_recipes(recipes, seeds, root, continued)
    result = summarize_recipes(recipes, seeds, root, command=command)
    result = keep_earlier(result, earlier)
    if not result["recipes"]:
        raise SettingError(f"root: no finished recipe runs in {str(root)!r}; train them first")
    chosen = choose(result)  # from the study alone
    if check_seeds is not None:
        if train:
            run_recipes([chosen], check_seeds, check_root, continued)
        checked = [chosen] + [r for r in recipes if r != chosen]
        result["check"] = summarize_recipes(checked, check_seeds, check_root)
        result["check"] = keep_earlier(result["check"], (earlier or {}).get("check"))
        chosen = choose(result)  # the check's seeds counted too
        order = [chosen] + [r for r in result["check"]["recipes"] if r != chosen]
        result["check"]["recipes"] = {
            r: result["check"]["recipes"][r] for r in order if r in result["check"]["recipes"]
        }
    result["chosen"] = {
        "recipe": chosen,
        "settings": RECIPES[chosen],
        "steps": recipe_config(chosen, 0, root).steps,
    }
    return result
