r"""The paper's ablations and the convergence evidence, on the training loop itself (ICCV §4.2).

    python -m cnet ablate                                  # every study, seeds 0-4
    python -m cnet ablate --studies connections --seeds 0  # one study, one seed

Every ablation is a *setting* of the same loop (:func:`cnet.train.train`), run on the shipped
base with the quick profile as the recipe study first chose it (400 updates of batch 32, one
constant rate of 2e-3, cubic timesteps, evaluated every 50 steps: :data:`ABLATION_SETTINGS`),
for the same five seeds; a seed sets everything random in a run (weights of the condition
encoder, the draw of every batch, its training and evaluation sets), and variant and default
share them seed by seed, so that they are compared seed by seed. A study compares variants
against the default ControlNet:

==============  ==========================================================================
study           variants (settings on top of the default)
==============  ==========================================================================
seeds           the default, and the default trained on to 2x the steps: the convergence
                curve over seeds (its first steps are the default run's, bit for bit: a run
                resumed equals the uninterrupted one)
connections     Gaussian-initialised connections (std = 1 and 0.1 × PyTorch's default
                initialisation's, the paper's; and std = lr, the size of AdamW's first step);
                and none, cnet's own contrast (:mod:`cnet.variants`)
lite            ControlNet-lite: one convolution per block of the trainable copy
prompt_dropout  no empty prompts (the default replaces 50 % of them)
data_size       1k and 20k training samples (the default: 4096)
grad_accum      2 micro-batches per update, against the default trained on to 2x the steps:
                the same samples, either as a larger batch or as more updates
long            the default, Gaussian connections and ControlNet-lite, each continued to 2x
                the steps (against the default at 2x): does a run collapse?
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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..injection import ControlledUNet
from ..train.config import PROFILES, SettingError, TrainConfig
from ..train.convergence import detect_sudden_convergence, onset_step
from ..train.data import cache_data
from ..train.evaluation import evaluate
from ..train.loop import train
from ..train.models import build_controlnet, load_base
from ..train.runs import load_checkpoint, read_log, result_prefix, run_finished

__all__ = [
    "ABLATION_SETTINGS",
    "DIVERGED_LOSS",
    "RUN_MEASURES",
    "SEEDS",
    "STUDIES",
    "VARIANTS",
    "ablation_config",
    "diverged_at",
    "finished",
    "measure_run",
    "noisy_evaluation_inputs",
    "read_step_time",
    "run_studies",
    "summarize",
    "train_command",
    "train_variant",
]

#: The quick profile as the recipe study first chose it (cnet.experiments.recipe: one constant
#: rate for the whole ControlNet), on which every ablation run was made: an ablation run is
#: ``python -m cnet train --profile quick`` with these settings where the profile differs, and
#: the variant's. Its evaluations every 50 steps time a jump of ~100 steps; its default runs
#: are the recipe check's runs of that recipe (``b32-lr2e-3-cubic``).
ABLATION_SETTINGS: dict = {
    "lr": 2e-3,
    "copy_lr_scale": 1.0,
    "lr_decay_start": 0,
    "lr_decay_steps": 100,  # (no decay: named so that a command's run equals the ablation's)
    "max_grad_norm": 0.0,
    "batch_size": 32,
    "steps": 400,
    "timesteps": "cubic",
    "channels_last": False,
}
#: Five seeds, the same for every variant: variants are compared seed by seed (paired).
SEEDS = (0, 1, 2, 3, 4)
_STEPS = ABLATION_SETTINGS["steps"]
VARIANTS: dict[str, dict] = {
    "default": {},
    "gaussian": {"connections": "gaussian", "connection_gain": 1.0},
    "gaussian-0.1": {"connections": "gaussian", "connection_gain": 0.1},
    # std = lr: the size of AdamW's first step, after which every zero-convolution weight is
    # about +-lr; does starting at exactly zero still differ from starting that small?
    "gaussian-lr": {"connections": "gaussian", "connection_std": ABLATION_SETTINGS["lr"]},
    "none": {"connections": "none"},
    "lite": {"trainable_copy": "lite"},
    "no-empty-prompts": {"empty_prompt_ratio": 0.0},
    "data-1k": {"train_size": 1024},
    "data-20k": {"train_size": 20480},
    # twice the samples per update, as many updates: the same samples as default-2x
    "accum-2": {"grad_accum": 2},
    "default-2x": {"steps": 2 * _STEPS},
    "gaussian-2x": {"connections": "gaussian", "connection_gain": 1.0, "steps": 2 * _STEPS},
    "lite-2x": {"trainable_copy": "lite", "steps": 2 * _STEPS},
}
#: Variants that continue another's run: their folder starts as a copy of it (same settings but
#: ``steps``, which a run may change when it resumes), so their first steps are its steps.
CONTINUES = {"default-2x": "default", "gaussian-2x": "gaussian", "lite-2x": "lite"}
STUDIES: dict[str, tuple[str, ...]] = {
    "seeds": ("default", "default-2x"),
    "connections": ("default", "gaussian", "gaussian-0.1", "gaussian-lr", "none"),
    "lite": ("default", "lite"),
    "prompt_dropout": ("default", "no-empty-prompts"),
    "data_size": ("data-1k", "default", "data-20k"),
    "grad_accum": ("default-2x", "accum-2"),
    "long": ("default-2x", "gaussian-2x", "lite-2x"),
}
#: What a study's variants are compared against (none for the seeds study: its two are one run;
#: accumulation against the default trained on the same number of samples).
REFERENCE = {"seeds": None, "long": "default-2x", "grad_accum": "default-2x"}


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
    quick = TrainConfig(**PROFILES["quick"])
    flags = {k: v for k, v in ABLATION_SETTINGS.items() if getattr(quick, k) != v}
    flags |= {**VARIANTS[variant], "seed": seed, "out": f"{root}/{variant}/seed{seed}"}
    return "python -m cnet train --profile quick " + " ".join(
        f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()
    )


def read_step_time(path: str | Path) -> dict:
    """The step times an earlier ablation summary measured (its ``step_time``); one line naming
    the setting if ``path`` holds none."""
    try:
        step_time = json.loads(Path(path).read_text())["step_time"]
        if isinstance(step_time, dict) and "step_ms" in step_time:
            return step_time
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise SettingError(
        f"step_time_from: {str(path)!r} is not allowed; expected an ablation summary JSON "
        "with its step_time, e.g. figures/07_ablations.json"
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
    # variant by variant over all seeds: a study cut short leaves whole variants to compare
    runs = [(v, seed) for v in variants for seed in seeds]
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
    zt, t, text = noisy_evaluation_inputs(pipe, data, seed)
    locked = pipe.unet(zt, t, text).sample
    return float((controlled(zt, t, text, data.condition) - locked).norm() / locked.norm())


def noisy_evaluation_inputs(pipe, data, seed: int = 0):
    """The evaluation set's latents, each noised at its own level from t = 50 to 950 (seeded
    noise), their timesteps and their prompts' embeddings: what a step-0 comparison of a
    controlled U-Net with the locked one predicts on."""
    g = torch.Generator().manual_seed(seed)
    z0 = data.latent_mean * pipe.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    t = torch.linspace(50, 950, len(z0)).long()
    zt = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(z0, noise, t)
    return zt, t, data.embeddings[data.prompt_index]


def _copy_drift(pipe, config: TrainConfig, checkpoint: Path) -> float | None:
    """||Θ_c(end) − Θ|| / ||Θ||: how far the trainable copy moved from the locked weights it
    was copied from (None for ControlNet-lite, which copies no blocks)."""
    if config.trainable_copy == "lite":
        return None
    initial = build_controlnet(pipe, config)
    trained = build_controlnet(pipe, config)
    load_checkpoint(checkpoint, {result_prefix(config): trained}, None)
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
#: miniature ControlNet's ε-loss is about 0.035 in the quick profile's runs (0.07-0.08 in the
#: full profile's, uniform timesteps), one that predicts nothing of the noise about 1
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
    load_checkpoint(folder / "checkpoint.safetensors", {result_prefix(config): trained}, None)
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


#: What the summary reports of each run, by name: one definition, used by the aggregate over
#: seeds (:func:`aggregate`) and by the paired comparisons (:mod:`cnet.experiments.ledger`).
RUN_MEASURES: dict[str, Callable[[dict], float | None]] = {
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


def aggregate(runs: list[dict]) -> dict:
    """A variant's measures over its seeds (:func:`spread` of each)."""
    return {name: spread([f(r) for r in runs]) for name, f in RUN_MEASURES.items()}


def finished(variant: str, seed: int, root: str | Path = "runs/ablate") -> bool:
    """Whether the run has reached its steps (its ``run.json`` says so)."""
    return run_finished(ablation_config(variant, seed, root))


def summarize(
    studies: Sequence[str],
    seeds: Sequence[int] = SEEDS,
    root: str | Path = "runs/ablate",
    step_time: dict | None = None,
    first_updates: dict | None = None,
    command: str = "",
) -> dict:
    """Measure every finished run of ``studies`` and gather them: per variant its settings,
    trainable parameters, runs and aggregate; per study its variants and its reference (the
    default, or :data:`REFERENCE`'s), against which :mod:`cnet.experiments.ledger` compares
    them seed by seed. A variant not yet finished on every seed is
    left out and listed under ``not_run`` with the commands that make its runs, so that a
    study cut short is reported as far as it went, never with fewer seeds on one side."""
    _check_studies(studies, seeds)
    variants = list(dict.fromkeys(v for s in studies for v in STUDIES[s]))
    if not all(finished("default", s, root) for s in seeds):
        raise SettingError(
            f"root: {str(root)!r} has no finished default run for every seed {list(seeds)}; "
            "expected them first (python -m cnet ablate --studies seeds)"
        )
    done = [v for v in variants if all(finished(v, s, root) for s in seeds)]
    pipe = load_base(ablation_config(variants[0], seeds[0], root).base)
    result: dict = {
        "command": command,
        "settings": ABLATION_SETTINGS,
        "seeds": list(seeds),
        "variants": {},
        "studies": {},
        "not_run": {
            v: [train_command(v, s, root) for s in seeds] for v in variants if v not in done
        },
    }
    reference = {
        s: measure_run(ablation_config("default", s, root).out, pipe)["curves"]["iou"][0]
        for s in seeds
    }  # the locked base's fidelity on each seed's evaluation set
    for variant in done:
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
        if reference and reference not in done:
            continue
        result["studies"][study] = {
            "variants": [v for v in names if v in done],
            "not_run": [v for v in names if v not in done],
            "reference": reference,
        }
    if step_time is not None:
        result["step_time"] = step_time
    if first_updates is not None:
        result["first_updates"] = first_updates
    return result
