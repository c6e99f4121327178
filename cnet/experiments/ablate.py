r"""The paper's ablations and the convergence evidence, on the training loop itself (ICCV §4.2).

    python -m cnet ablate                                  # every study, seeds 0 1 2
    python -m cnet ablate --studies connections --seeds 0  # one study, one seed

Every ablation is a *setting* of the same loop (:func:`cnet.train.train`), run on the shipped
base with the budget of the quick profile before the recipe study (600 steps of batch 16),
evaluated every ``eval_every`` = 25 steps, for the same seeds; a seed sets everything random in
a run (weights of the condition encoder, the draw of every batch, its training and evaluation
sets), and variant and default share them seed by seed. A study compares variants against the
default ControlNet:

==============  ==========================================================================
study           variants (settings on top of the default)
==============  ==========================================================================
seeds           the default, and the default trained on to 1200 steps: the convergence
                curve with error bars (its first 600 steps are the default run's, bit for
                bit: a run resumed equals the uninterrupted one)
connections     Gaussian-initialised connections (std = 1 and 0.1 × PyTorch's default
                initialisation's), the paper's; and none, cnet's own contrast
                (:mod:`cnet.variants`)
lite            ControlNet-lite: one convolution per block of the trainable copy
prompt_dropout  no empty prompts (the default replaces 50 % of them)
data_size       1k and 20k training samples (the default: 4096)
lr, grad_accum  notebook 05's knobs: lr 1e-3 (default 2e-3), 2 micro-batches per update
long            the default, Gaussian connections and ControlNet-lite, each continued to 1200
                steps (against the default at 1200)
==============  ==========================================================================

What each run is measured by (:func:`measure_run`): its fidelity curve and, from it, the onset
(:func:`cnet.train.convergence.onset_step`, against the locked base's fidelity on the same
evaluation set: the default run's step-0 value, so that a variant damaged at step 0 does not
count its recovery as an onset) and the 20/50/80 % steps and sharpest single
interval (:func:`cnet.train.convergence.detect_sudden_convergence`); at step 0, how far the
controlled U-Net's prediction is from the locked one's; at the end, fidelity with the
prompts and with empty prompts, colour accuracy (the prompt still obeyed) and how far the
trainable copy drifted from the weights it was copied from; and whether the run diverged
(:func:`diverged_at`). :func:`summarize` gathers the
runs, mean and spread over seeds, into one JSON (``figures/07_ablations.json``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..injection import ControlledUNet
from ..train.config import PROFILES, SettingError, TrainConfig
from ..train.convergence import detect_sudden_convergence, onset_step
from ..train.data import build_controlnet, cache_data, load_base
from ..train.evaluate import evaluate
from ..train.loop import train
from ..train.runs import load_checkpoint, read_log

__all__ = [
    "ABLATION_SETTINGS",
    "DIVERGED_LOSS",
    "SEEDS",
    "STUDIES",
    "VARIANTS",
    "ablation_config",
    "diverged_at",
    "measure_run",
    "run_studies",
    "summarize",
    "train_command",
    "train_variant",
]

#: The quick profile notebook 07's shipped runs were made with (lr 2e-3, 600 steps of batch 16,
#: uniform timesteps: the profile before the recipe study, cnet.experiments.recipe), and evaluations
#: dense enough to time a jump of ~100 steps.
ABLATION_SETTINGS: dict = {
    "lr": 2e-3,
    "batch_size": 16,
    "steps": 600,
    "timesteps": "uniform",
    "lr_decay_start": 0,  # a constant rate
    "eval_every": 25,
}
SEEDS = (0, 1, 2)
VARIANTS: dict[str, dict] = {
    "default": {},
    "gaussian": {"connections": "gaussian", "connection_gain": 1.0},
    "gaussian-0.1": {"connections": "gaussian", "connection_gain": 0.1},
    "none": {"connections": "none"},
    "lite": {"trainable_copy": "lite"},
    "no-empty-prompts": {"empty_prompt_ratio": 0.0},
    "data-1k": {"train_size": 1024},
    "data-20k": {"train_size": 20480},
    "lr-1e-3": {"lr": 1e-3},
    "accum-2": {"grad_accum": 2},
    "default-1200": {"steps": 1200},
    "gaussian-1200": {"connections": "gaussian", "connection_gain": 1.0, "steps": 1200},
    "lite-1200": {"trainable_copy": "lite", "steps": 1200},
}
#: Variants that continue another's run: their folder starts as a copy of it (same settings but
#: ``steps``, which a run may change when it resumes), so their first steps are its steps.
CONTINUES = {"default-1200": "default", "gaussian-1200": "gaussian", "lite-1200": "lite"}
STUDIES: dict[str, tuple[str, ...]] = {
    "seeds": ("default", "default-1200"),
    "connections": ("default", "gaussian", "gaussian-0.1", "none"),
    "lite": ("default", "lite"),
    "prompt_dropout": ("default", "no-empty-prompts"),
    "data_size": ("data-1k", "default", "data-20k"),
    "lr": ("default", "lr-1e-3"),
    "grad_accum": ("default", "accum-2"),
    "long": ("default-1200", "gaussian-1200", "lite-1200"),
}
#: What a study's variants are compared against (none for the seeds study: its two are one run).
REFERENCE = {"seeds": None, "long": "default-1200"}


def ablation_config(variant: str, seed: int, root: str | Path = "runs/ablate") -> TrainConfig:
    """The settings of one run: the ablation settings, the variant's, the seed."""
    if variant not in VARIANTS:
        raise SettingError(
            f"variant: {variant!r} is not allowed; expected one of " + ", ".join(VARIANTS)
        )
    return TrainConfig(
        **{**ABLATION_SETTINGS, **VARIANTS[variant]}, seed=seed, out=f"{root}/{variant}/seed{seed}"
    ).check()


def train_command(variant: str, seed: int, root: str | Path = "runs/ablate") -> str:
    """The ``python -m cnet train`` line that makes the same run as the ablation's."""
    flags = {k: v for k, v in ABLATION_SETTINGS.items() if PROFILES["quick"].get(k) != v}
    flags |= {**VARIANTS[variant], "seed": seed, "out": f"{root}/{variant}/seed{seed}"}
    return "python -m cnet train --profile quick " + " ".join(
        f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()
    )


def _check_studies(studies: Sequence[str], seeds: Sequence[int]) -> None:
    for study in studies:
        if study not in STUDIES:
            raise SettingError(
                f"studies: {study!r} is not allowed; expected some of " + ", ".join(STUDIES)
            )
    if not seeds or any(s < 0 for s in seeds):
        raise SettingError(f"seeds: {list(seeds)!r} is not allowed; expected integers >= 0")


def run_studies(
    studies: Sequence[str], seeds: Sequence[int] = SEEDS, root: str | Path = "runs/ablate"
) -> list[Path]:
    """Train (or resume, or skip, when finished) every run the studies need; returns their
    folders. Each run is an ordinary training run (``python -m cnet train`` with its
    settings gives the same one)."""
    _check_studies(studies, seeds)
    variants = list(dict.fromkeys(v for s in studies for v in STUDIES[s]))
    runs = [(v, seed) for seed in seeds for v in variants]
    for variant, seed in runs:
        train_variant(variant, seed, root)
    return [Path(ablation_config(v, seed, root).out) for v, seed in runs]


def train_variant(variant: str, seed: int, root: str | Path = "runs/ablate") -> dict:
    """Train (or resume, or leave, when finished) one run; a variant that continues another
    (:data:`CONTINUES`) starts from a copy of that run's folder, once it has finished."""
    config = ablation_config(variant, seed, root)
    source = CONTINUES.get(variant)
    if source and not Path(config.out).exists():
        first = ablation_config(source, seed, root)
        if not (Path(first.out) / "run.json").exists():
            train(first, profile="ablation")
        staging = Path(config.out).with_name(Path(config.out).name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)  # moved into place whole: never half a copy
        shutil.copytree(first.out, staging, ignore=shutil.ignore_patterns("ablation.json"))
        staging.replace(config.out)
    print(f"--- {config.out}")
    return train(config, profile="ablation")


# ------------------------------------------------------------------------------------------
# Measuring one run
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def step0_deviation(pipe, config: TrainConfig, data, seed: int = 0) -> float:
    r"""How far the controlled U-Net's prediction is from the locked U-Net's before any
    update, :math:`\lVert \epsilon_c - \epsilon \rVert / \lVert \epsilon \rVert`, on the
    evaluation set's latents, each at its own noise level from t = 50 to 950 (exactly 0 with
    zero convolutions, Eq. 4)."""
    torch.manual_seed(config.seed)  # as the loop builds it
    controlled = ControlledUNet(pipe.unet, build_controlnet(pipe, config))
    g = torch.Generator().manual_seed(seed)
    z0 = data.latent_mean * pipe.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    t = torch.linspace(50, 950, len(z0)).long()
    zt = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(z0, noise, t)
    text = data.embeddings[data.prompt_index]
    locked = pipe.unet(zt, t, text).sample
    return float((controlled(zt, t, text, data.condition) - locked).norm() / locked.norm())


def _copy_drift(pipe, config: TrainConfig, checkpoint: Path) -> float | None:
    """||Θ_c(end) − Θ|| / ||Θ||: how far the trainable copy moved from the locked weights it
    was copied from (None for ControlNet-lite, which copies no blocks)."""
    if config.trainable_copy == "lite":
        return None
    initial = build_controlnet(pipe, config)
    trained = build_controlnet(pipe, config)
    load_checkpoint(checkpoint, {"controlnet": trained}, None)
    before = torch.cat([p.detach().reshape(-1) for p in initial.theta_c_parameters()])
    after = torch.cat([p.detach().reshape(-1) for p in trained.theta_c_parameters()])
    return float((after - before).norm() / before.norm())


def _curves(folder: Path, log) -> dict:
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    evals = [e["eval"] for e in entries if "eval" in e]
    every = 5  # the norms are logged every step; 1 in 5 is plenty for a plot
    residual = [norms for name, norms in log.weight_norm.items() if name != "zero_conv.hint"]
    return {
        "eval_steps": log.eval_steps,
        "iou": log.eval_iou,
        "layout_iou": [e["layout_iou"] for e in evals],
        "colours_ok": log.eval_colours,
        "norm_steps": log.steps[::every],
        "hint_weight_norm": log.weight_norm.get("zero_conv.hint", [])[::every],
        # the 12 + 1 residual zero convolutions together
        "residual_weight_norm": [
            float(np.sqrt(sum(n[i] ** 2 for n in residual)))
            for i in range(0, len(log.steps), every)
        ],
        "copy_grad_norm": log.copy_grad_norm[::every],
        "loss": log.loss[::every],
    }


MEASURES_VERSION = 3  # bump when measure_run measures something else: the caches are redone
#: A run has diverged where its loss, averaged over 25 logged steps, passes this: a working
#: miniature ControlNet's ε-loss is about 0.08, one that predicts nothing of the noise about 1
#: (the noise's variance).
DIVERGED_LOSS = 0.5


def diverged_at(steps: Sequence[int], loss: Sequence[float], window: int = 25) -> int | None:
    """The first logged step at which the mean loss of the ``window`` steps ending there passes
    :data:`DIVERGED_LOSS` (None if it never does). The loop stops only on a non-finite loss;
    this finds a run that stays finite but no longer predicts the noise."""
    means = np.convolve(np.asarray(loss, dtype=np.float64), np.ones(window) / window, "valid")
    above = np.nonzero(means > DIVERGED_LOSS)[0]
    return int(steps[above[0] + window - 1]) if len(above) else None


def measure_run(folder: str | Path, pipe=None, reference: float | None = None) -> dict:
    """Everything the ablations report of one finished run (cached in the run's
    ``ablation.json`` next to the checkpoint it measured). ``reference``: the fidelity the
    onset is counted from (default: the run's own at step 0)."""
    folder = Path(folder)
    run = json.loads((folder / "run.json").read_text())
    cache = folder / "ablation.json"
    key = {"steps": run["steps"], "version": MEASURES_VERSION, "reference": reference}
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    config = TrainConfig(**run["config"])
    pipe = pipe or load_base(config.base)
    log = read_log(folder)
    curves = _curves(folder, log)
    report = detect_sudden_convergence(curves["eval_steps"], curves["iou"])
    eval_data = cache_data(pipe, config.task, config.eval_size, "eval", config.seed)
    trained = build_controlnet(pipe, config)
    load_checkpoint(folder / "checkpoint.safetensors", {"controlnet": trained}, None)
    prompt_free, _ = evaluate(
        pipe,
        ControlledUNet(pipe.unet, trained.eval()),
        eval_data,
        config.eval_steps,
        config.guidance_scale,
        prompt_free=True,
    )
    result = {
        "key": key,
        "run": str(folder),
        "seed": config.seed,
        "steps": run["steps"],
        "wall_time_s": run["wall_time_s"],
        "curves": curves,
        "report": report.as_dict(),
        "onset": onset_step(curves["eval_steps"], curves["iou"], reference=reference),
        "diverged_at": diverged_at(log.steps, log.loss),
        "final": run["final_eval"],
        "prompt_free_layout_iou": prompt_free["layout_iou"],
        "step0_deviation": step0_deviation(pipe, config, eval_data),
        "copy_drift": _copy_drift(pipe, config, folder / "checkpoint.safetensors"),
        "trainable_parameters": sum(p.numel() for p in trained.parameters() if p.requires_grad),
    }
    cache.write_text(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------
# Over seeds and studies
# ------------------------------------------------------------------------------------------


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation, min and max over the seeds that have a value, and how
    many of them do (an onset is None where a run did not leave the step-0 band for two
    evaluations in a row)."""
    have = [float(v) for v in values if v is not None]
    out = {"n": len(have), "of": len(values)}
    if have:
        out |= {
            "mean": float(np.mean(have)),
            "min": min(have),
            "max": max(have),
            "sd": float(np.std(have, ddof=1)) if len(have) > 1 else None,
        }
    return out


def differs(a: dict, b: dict) -> bool:
    """Two spreads' seed ranges do not overlap, every seed having a value on both sides and at
    least two of them: the one way cnet calls a difference between variants larger than the
    seed-to-seed spread. It is a weak test: with 3 seeds against 3, two samples of the same
    distribution fail to overlap with probability 2 · 3! 3! / 6! = 0.1, so among many
    comparisons some such calls are chance."""
    full = all(s.get("n", 0) >= 2 and s["n"] == s["of"] for s in (a, b))
    return full and (a["max"] < b["min"] or b["max"] < a["min"])


def aggregate(runs: list[dict]) -> dict:
    """A variant's measures over its seeds (:func:`spread` of each)."""
    pick = {
        "onset": lambda r: r["onset"],
        "t20": lambda r: r["report"]["start"],
        "t50": lambda r: r["report"]["step"],
        "t80": lambda r: r["report"]["end"],
        "sharpest_share": lambda r: r["report"]["sharpest_share"],
        "final_iou": lambda r: r["final"]["iou"],
        "final_layout_iou": lambda r: r["final"]["layout_iou"],
        "final_colours_ok": lambda r: r["final"]["colours_ok"],
        "prompt_free_layout_iou": lambda r: r["prompt_free_layout_iou"],
        "step0_iou": lambda r: r["curves"]["iou"][0],
        "step0_colours_ok": lambda r: r["curves"]["colours_ok"][0],
        "step0_deviation": lambda r: r["step0_deviation"],
        "copy_drift": lambda r: r["copy_drift"],
        "wall_time_s": lambda r: r["wall_time_s"],
        "diverged_at": lambda r: r["diverged_at"],
    }
    return {name: spread([f(r) for r in runs]) for name, f in pick.items()}


def summarize(
    studies: Sequence[str],
    seeds: Sequence[int] = SEEDS,
    root: str | Path = "runs/ablate",
    step_time: dict | None = None,
    first_updates: dict | None = None,
    command: str = "",
) -> dict:
    """Measure every finished run of ``studies`` and gather them: per variant its settings,
    trainable parameters, runs and aggregate; per study its variants, its reference (the
    default, or :data:`REFERENCE`'s) and, for each variant against it, which measures differ
    beyond the seed spread (:func:`differs`)."""
    _check_studies(studies, seeds)
    variants = list(dict.fromkeys(v for s in studies for v in STUDIES[s]))
    pipe = load_base(ablation_config(variants[0], seeds[0], root).base)
    result: dict = {
        "command": command,
        "settings": ABLATION_SETTINGS,
        "seeds": list(seeds),
        "variants": {},
        "studies": {},
    }
    reference = {
        s: measure_run(ablation_config("default", s, root).out, pipe)["curves"]["iou"][0]
        for s in seeds
    }  # the locked base's fidelity on each seed's evaluation set
    for variant in variants:
        runs = [
            measure_run(
                ablation_config(variant, s, root).out,
                pipe,
                None if variant == "default" else reference[s],
            )
            for s in seeds
        ]
        result["variants"][variant] = {
            "settings": VARIANTS[variant],
            "runs": runs,
            "aggregate": aggregate(runs),
            "train_commands": [train_command(variant, s, root) for s in seeds],
            "trainable_parameters": runs[0]["trainable_parameters"],
        }
    for study in studies:
        names, reference = STUDIES[study], REFERENCE.get(study, "default")
        base = result["variants"][reference]["aggregate"] if reference else {}
        result["studies"][study] = {
            "variants": list(names),
            "reference": reference,
            "differs_from_reference": {
                v: {k: differs(result["variants"][v]["aggregate"][k], base[k]) for k in base}
                for v in names
                if reference and v != reference
            },
        }
    if step_time is not None:
        result["step_time"] = step_time
    if first_updates is not None:
        result["first_updates"] = first_updates
    return result
