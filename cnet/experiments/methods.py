r"""ControlNet against the methods that followed it, trained side by side on the same base
(notebook 08).

    python -m cnet compare-methods                               # every method, seeds 0-2
    python -m cnet compare-methods --methods t2i-adapter --seeds 0

Every method is a setting of the one loop (:func:`cnet.train.train`, ``method``), trained on
the shipped base with the quick profile (the recipe study's choice: 800 updates of batch 32,
the same rates, clip, timesteps and decay), for the same seeds; a seed sets the data, the order
of the batches and the evaluation set, so methods are compared seed by seed. What each method
changes (:data:`METHODS_COMPARED`, each paper cited in its module):

==================  ======================================================================
method              what trains, what stays locked, where the condition enters
==================  ======================================================================
controlnet          a trainable copy of the U-Net's encoder and a condition encoder; its 12
                    + 1 zero-convolved outputs added to the locked U-Net's skip connections
                    and middle block (Eq. 2; :mod:`cnet.controlnet`)
controlnet-lite     the same, with one convolution per block instead of the copy (ICCV
                    §4.2's ablation; :mod:`cnet.variants`)
t2i-adapter         a small network of its own that reads the condition once, its four maps
                    added inside the locked encoder's blocks (:mod:`cnet.adapter`)
controlnet-xs       a narrow control network beside the locked U-Net, exchanging features with
                    it at every block, both ways (:mod:`cnet.controlnet_xs`)
concat              the whole U-Net, the condition's latent as extra input channels (the
                    design ControlNet argues against; :mod:`cnet.concat`)
==================  ======================================================================

What each run is measured by (:func:`measure_method_run`): its fidelity curve, the onset (the
first evaluation above the **locked base's** fidelity on the seed's evaluation set by the
margin, :func:`cnet.train.convergence.onset_step`: the base, not the run's own step 0, since a
T2I-Adapter does not start at the base), the final fidelity with the prompts and the layout
IoU with empty prompts; whether the method keeps the base **exactly** before any update and,
once trained, at condition weight 0 (the concatenation has no weight: its condition's latent at
zero, its pipeline's unconditional image), as the largest relative difference of the noise
predictions from the base's over the evaluation set; the final fidelity on the fine-tuned base
``models/miniature-sd-cycled`` with the trained weights attached unchanged (the concatenation
*is* a U-Net, so it has nothing to attach); for the methods whose diffusers class composes
several controls (:data:`COMPOSING`), each object's fidelity on notebook 06's two-object scenes
with its own control alone and with a second control trained on :data:`SECOND_TASK` at the same
time (:func:`measure_composition`); trainable parameters and wall time. Step time, peak memory
and sampling cost come from ``bench/`` (``method_cost``), ratios in one run.

Two budgets. The runs above share a budget of **samples**: 800 updates of 32 each. The
**equal-wall-time** arm (:func:`equal_time_config`) gives every method the time ControlNet's 800
updates take: its updates are 800 divided by its step-time ratio to ControlNet's from the bench
(``method_cost``, measured side by side in one run), to the nearest evaluation interval, with
the rate decaying over the same last 3/8 of them as the profile's. A method within half an
interval of ControlNet's time (ControlNet-XS) keeps its run; the others train again, as
``<method>/time-seed<s>``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..concat import ConcatenatedUNet
from ..train.config import PROFILES, SettingError, TrainConfig, for_method
from ..train.convergence import detect_sudden_convergence, onset_step
from ..train.data import cache_data
from ..train.evaluation import evaluate
from ..train.loop import train
from ..train.models import build_trained, controlled_by, load_base
from ..train.optim import pretrained_parameters
from ..train.runs import load_checkpoint, read_log, result_prefix, run_finished
from ..world.finetune import style_of
from .ablate import noisy_evaluation_inputs, spread
from .composition import composition_scenes, measure_compositions

__all__ = [
    "METHODS_COMPARED",
    "COMPOSING",
    "COST_FROM",
    "SECOND_TASK",
    "SEEDS",
    "TRANSFER_BASE",
    "aggregate_runs",
    "compare_methods",
    "equal_time_command",
    "equal_time_config",
    "equal_time_runs",
    "equal_time_steps",
    "run_equal_time",
    "summarize_equal_time",
    "finished",
    "measure_composition",
    "measure_method_run",
    "method_config",
    "parameter_roles",
    "run_methods",
    "second_control_config",
    "summarize_methods",
    "train_command",
]

#: The methods compared, each as settings on top of the quick profile (a ControlNet-only value
#: of the profile gives way for another method: :func:`cnet.train.config.for_method`).
METHODS_COMPARED: dict[str, dict] = {
    "controlnet": {},
    "controlnet-lite": {"trainable_copy": "lite"},
    "t2i-adapter": {"method": "t2i-adapter"},
    "controlnet-xs": {"method": "controlnet-xs"},
    "concat": {"method": "concat"},
}
#: Three seeds, the same for every method: methods are compared seed by seed (paired).
SEEDS = (0, 1, 2)
#: The methods whose diffusers class takes several controls at once: ControlNet's residuals
#: added (ICCV §3.4, diffusers' MultiControlNetModel), T2I-Adapters' features summed (diffusers'
#: MultiAdapter). diffusers' ControlNet-XS U-Net takes one, and the concatenation one input.
COMPOSING = ("controlnet", "controlnet-lite", "t2i-adapter")
#: What a composing method's second control is trained on: the segmentation map of the other
#: object of notebook 06's two-object scenes (cnet.experiments.composition).
SECOND_TASK = "segmentation"
#: The fine-tune of the base the trained weights are attached to unchanged.
TRANSFER_BASE = "models/miniature-sd-cycled"
MEASURES_VERSION = 3  # bump when measure_method_run measures something else


def method_config(name: str, seed: int, root: str | Path = "runs/methods") -> TrainConfig:
    """The settings of one run: the quick profile for the method, the method's, the seed."""
    if name not in METHODS_COMPARED:
        raise SettingError(
            f"methods: {name!r} is not allowed; expected some of " + ", ".join(METHODS_COMPARED)
        )
    settings = METHODS_COMPARED[name]
    profile = for_method(PROFILES["quick"], settings.get("method", "controlnet"))
    return TrainConfig(
        **{**profile, **settings}, seed=seed, out=f"{root}/{name}/seed{seed}"
    ).check()


def second_control_config(name: str, seed: int, root: str | Path = "runs/methods"):
    """The settings of a composing method's second control (:data:`COMPOSING`): the method's
    run, on :data:`SECOND_TASK`."""
    config = method_config(name, seed, root)
    out = f"{root}/{name}/{SECOND_TASK}-seed{seed}"
    return dataclasses.replace(config, task=SECOND_TASK, out=out).check()


def train_command(
    name: str, seed: int, root: str | Path = "runs/methods", task: str = "fill"
) -> str:
    """The ``python -m cnet train`` line that makes the same run (with ``task``
    :data:`SECOND_TASK`: the method's second control)."""
    second = {"task": task} if task != "fill" else {}
    out = f"{root}/{name}/" + (f"{task}-seed{seed}" if second else f"seed{seed}")
    return _train_line({**METHODS_COMPARED[name], **second, "seed": seed, "out": out})


def _train_line(flags: dict) -> str:
    """The quick profile with ``flags``, as a ``python -m cnet train`` line."""
    return "python -m cnet train --profile quick " + " ".join(
        f"--{k} {v}" for k, v in flags.items()
    )


def equal_time_steps(name: str, cost: dict) -> int:
    """The updates of ``name``'s equal-wall-time run: the quick profile's divided by the
    method's step-time ratio to ControlNet's (``cost``: the bench's ``method_cost`` results), to
    the nearest evaluation interval (at least one)."""
    profile = method_config(name, 0)
    ratio = cost["step_time_ratio"][name] / cost["step_time_ratio"]["controlnet"]
    intervals = round(profile.steps / ratio / profile.eval_every)
    return max(1, intervals) * profile.eval_every


def equal_time_config(name: str, seed: int, root: str | Path, cost: dict) -> TrainConfig:
    """The settings of ``name``'s equal-wall-time run (:func:`equal_time_steps`; ``cost``: the
    bench's ``method_cost`` results): the method's run where the updates come out the same,
    else that run with the updates changed, the rate decaying over the same share of them and
    held at its floor over the same share after, in ``<method>/time-seed<s>``."""
    config = method_config(name, seed, root)
    steps = equal_time_steps(name, cost)
    if steps == config.steps:
        return config
    changes = {"steps": steps, "out": f"{root}/{name}/time-seed{seed}"}
    if config.lr_decay_start:
        decay = steps * config.lr_decay_steps // config.steps
        floor = config.steps - config.lr_decay_start - config.lr_decay_steps
        start = steps - decay - steps * max(floor, 0) // config.steps
        changes |= {"lr_decay_start": start, "lr_decay_steps": decay}
    return dataclasses.replace(config, **changes).check()


def equal_time_command(name: str, seed: int, root: str | Path, cost: dict) -> str:
    """The ``python -m cnet train`` line that makes ``name``'s equal-wall-time run."""
    config, own = equal_time_config(name, seed, root, cost), method_config(name, seed, root)
    if config == own:
        return train_command(name, seed, root)
    changed = ("steps", "lr_decay_start", "lr_decay_steps")
    flags = {**METHODS_COMPARED[name], "seed": seed, "out": config.out}
    flags |= {k: getattr(config, k) for k in changed if getattr(config, k) != getattr(own, k)}
    return _train_line(flags)


def _check(names: Sequence[str], seeds: Sequence[int]) -> None:
    for name in names:
        method_config(name, 0)  # one line naming the method if it is not one
    if not seeds or any(s < 0 for s in seeds):
        raise SettingError(f"seeds: {list(seeds)!r} is not allowed; expected integers >= 0")


def run_methods(
    names: Sequence[str] = tuple(METHODS_COMPARED),
    seeds: Sequence[int] = SEEDS,
    root: str | Path = "runs/methods",
) -> list[Path]:
    """Train (or resume, or leave, when finished) every method's run for every seed, method
    by method; returns their folders."""
    _check(names, seeds)
    configs = [method_config(n, s, root) for n in names for s in seeds]
    # the second controls after every method's first: a comparison cut short has its runs
    configs += [second_control_config(n, s, root) for n in names if n in COMPOSING for s in seeds]
    for config in configs:
        print(f"--- {config.out}")
        train(config, profile="methods")
    return [Path(config.out) for config in configs]


def run_equal_time(
    names: Sequence[str], seeds: Sequence[int], root: str | Path, cost: dict
) -> list[Path]:
    """Train (or resume, or leave) the equal-wall-time runs that are not the methods' own (of
    the methods the bench timed)."""
    timed = [n for n in names if n in cost["step_time_ratio"]]
    configs = [
        equal_time_config(n, s, root, cost)
        for n in timed
        for s in seeds
        if equal_time_steps(n, cost) != method_config(n, s, root).steps  # else its own runs
    ]
    for config in configs:
        print(f"--- {config.out}")
        train(config, profile="methods")
    return [Path(config.out) for config in configs]


def finished(name: str, seed: int, root: str | Path = "runs/methods", second: bool = False) -> bool:
    """Whether the run (or its second control's) has reached its steps (its ``run.json`` says
    so)."""
    return run_finished((second_control_config if second else method_config)(name, seed, root))


# ------------------------------------------------------------------------------------------
# Measuring one run
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def base_deviation(pipe, controlled, data, weight: float = 1.0, seed: int = 0) -> float:
    r"""How far ``controlled``'s noise prediction is from the locked base's, at condition
    weight ``weight``: :math:`\max |\epsilon_c - \epsilon| / \max |\epsilon|` over the
    evaluation set's latents, each at its own noise level from t = 50 to 950 (0 exactly where the
    base is kept bit for bit). A concatenating U-Net at weight 0 gets its condition's latent at
    zero (its pipeline's unconditional image)."""
    zt, t, text = noisy_evaluation_inputs(pipe, data, seed)
    base = pipe.unet(zt, t, text).sample
    if isinstance(controlled, ConcatenatedUNet):
        latents = controlled.condition_latents(data.condition) * weight
        predicted = controlled.predict(zt, t, text, latents)
    else:
        predicted = controlled(zt, t, text, data.condition, weight)
    return float((predicted - base).abs().max() / base.abs().max())


def parameter_roles(pipe, config: TrainConfig) -> dict:
    """Where a method's weights start, counted on the model the loop builds (entries):
    ``locked`` the base U-Net's weights it runs through unchanged (none for the concatenation,
    whose U-Net is trained); ``copied`` trained weights that start as the base's (ControlNet's
    copy :math:`\\Theta_c`, ControlNet-lite's ``conv_in``, all of the concatenation's but its
    new channels); ``zero`` trained kernels' entries (biases not counted) that start at exactly
    zero (the zero convolutions, ControlNet-XS's control → base convolutions, the
    concatenation's new channels: what keeps the base before any update); ``random`` the rest
    of what trains."""
    trained = _trained(pipe, config)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    total = sum(p.numel() for p in trainable)
    zero = sum(int((p == 0).sum()) for p in trainable if p.ndim >= 2)
    if config.method == "concat":
        copied = total - zero
    elif config.method == "controlnet":
        copied = sum(p.numel() for p in pretrained_parameters(trained, config) if p.requires_grad)
    else:
        copied = 0
    locked = 0 if config.method == "concat" else sum(p.numel() for p in pipe.unet.parameters())
    return {"locked": locked, "copied": copied, "zero": zero, "random": total - copied - zero}


def _trained(pipe, config: TrainConfig, checkpoint: Path | None = None):
    """What the run trains, at initialisation (as the loop builds it from the seed) or with
    the checkpoint's weights, on ``pipe``'s U-Net."""
    torch.manual_seed(config.seed)
    trained = build_trained(pipe, config)
    if checkpoint is not None:
        load_checkpoint(checkpoint, {result_prefix(config): trained}, None)
    return trained.eval()


def measure_method_run(folder: str | Path, pipe=None, transfer=None) -> dict:
    """Everything the comparison reports of one finished run (cached in the run's
    ``methods.json``); ``transfer``: the fine-tuned base (:data:`TRANSFER_BASE`) loaded."""
    folder = Path(folder)
    run = json.loads((folder / "run.json").read_text())
    cache = folder / "methods.json"
    key = {"steps": run["steps"], "version": MEASURES_VERSION}
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())
    config = TrainConfig(**run["config"])
    pipe = pipe or load_base(config.base)
    log = read_log(folder)
    data = cache_data(pipe, config.task, config.eval_size, "eval", config.seed)
    sampler = (config.eval_steps, config.guidance_scale)
    base_alone, _ = evaluate(pipe, None, data, *sampler)
    initial = controlled_by(pipe, _trained(pipe, config))
    trained = _trained(pipe, config, folder / "checkpoint.safetensors")
    controlled = controlled_by(pipe, trained)
    prompt_free, _ = evaluate(pipe, controlled, data, *sampler, prompt_free=True)
    result = {
        "key": key,
        "run": str(folder),
        "seed": config.seed,
        "steps": run["steps"],
        "wall_time_s": run["wall_time_s"],
        "device": run["device_name"],
        "curves": {"eval_steps": log.eval_steps, "iou": log.eval_iou, "loss": log.loss[::5]},
        "report": detect_sudden_convergence(log.eval_steps, log.eval_iou).as_dict(),
        "base_iou": base_alone["iou"],
        "onset": onset_step(log.eval_steps, log.eval_iou, reference=base_alone["iou"]),
        "final": run["final_eval"],
        "prompt_free_layout_iou": prompt_free["layout_iou"],
        "deviation_at_init": base_deviation(pipe, initial, data),
        "deviation_at_weight_0": base_deviation(pipe, controlled, data, 0.0),
        "trainable_parameters": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "transfer": _transfer(transfer, config, trained, sampler),
    }
    cache.write_text(json.dumps(result) + "\n")
    return result


def _transfer(fine_tune, config: TrainConfig, trained, sampler) -> dict | None:
    """Fidelity on the fine-tuned base, alone and with the trained weights attached unchanged
    (None for the concatenation, which is itself a U-Net, or without a fine-tune)."""
    if fine_tune is None or config.method == "concat":
        return None
    style = style_of(TRANSFER_BASE)
    data = cache_data(fine_tune, config.task, config.eval_size, "eval", config.seed, style=style)
    alone, _ = evaluate(fine_tune, None, data, *sampler)
    attached, _ = evaluate(fine_tune, controlled_by(fine_tune, trained), data, *sampler)
    return {"fine_tune_iou": alone["iou"], "iou": attached["iou"]}


def measure_composition(name: str, seed: int, root: str | Path, pipe) -> dict:
    """Seed ``seed``'s run of a composing method with its second control, on 32 two-object
    scenes of that seed (:func:`cnet.experiments.composition.composition_scenes`): each object's
    IoU and layout IoU with its own control alone and with both at once (ControlNets' residuals
    added, adapters' features summed), sampled as the runs evaluate (cached in the run's
    ``composition.json``)."""
    first, second = method_config(name, seed, root), second_control_config(name, seed, root)
    cache = Path(first.out) / "composition.json"
    key = {"version": MEASURES_VERSION, "second": second.out}
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())
    fill = _trained(pipe, first, Path(first.out) / "checkpoint.safetensors")
    other = _trained(pipe, second, Path(second.out) / "checkpoint.safetensors")
    data = composition_scenes(first.eval_size, seed)
    feeds = {
        "first alone": (controlled_by(pipe, fill), data.outline),
        "second alone": (controlled_by(pipe, other), data.segmentation),
        "both": (controlled_by(pipe, [fill, other]), [data.outline, data.segmentation]),
    }
    rows, _ = measure_compositions(pipe, feeds, data, first.eval_steps, first.guidance_scale)
    # did the second control learn its task? (its onset, against the base on its evaluation set)
    log = read_log(second.out)
    own = cache_data(pipe, second.task, second.eval_size, "eval", second.seed)
    base_alone, _ = evaluate(pipe, None, own, second.eval_steps, second.guidance_scale)
    learned = {
        "final_iou": log.eval_iou[-1],
        "base_iou": base_alone["iou"],
        "onset": onset_step(log.eval_steps, log.eval_iou, reference=base_alone["iou"]),
    }
    result = {"key": key, "seed": seed, "rows": rows, "second": learned}
    cache.write_text(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------
# Over methods and seeds
# ------------------------------------------------------------------------------------------

#: What the summary reports of each run, by name (one definition, used by the aggregate over
#: seeds and by the paired comparisons of notebook 08).
RUN_MEASURES = {
    "onset": lambda r: r["onset"],
    "final_iou": lambda r: r["final"]["iou"],
    "final_layout_iou": lambda r: r["final"]["layout_iou"],
    "final_colours_ok": lambda r: r["final"]["colours_ok"],
    "prompt_free_layout_iou": lambda r: r["prompt_free_layout_iou"],
    "step0_iou": lambda r: r["curves"]["iou"][0],
    "deviation_at_init": lambda r: r["deviation_at_init"],
    "deviation_at_weight_0": lambda r: r["deviation_at_weight_0"],
    "transfer_iou": lambda r: r["transfer"]["iou"] if r["transfer"] else None,
    # each object's layout IoU with both controls at once, less with its own control alone,
    # averaged over the two objects (None where the method composes none, or where its second
    # control never started following its condition: then there is nothing to compose)
    "composition_change": lambda r: _composition_change(r.get("composition")),
    "second_control_iou": lambda r: (
        r["composition"]["second"]["final_iou"] if r.get("composition") else None
    ),
    "wall_time_s": lambda r: r["wall_time_s"],
}


def aggregate_runs(runs: list[dict]) -> dict:
    """Each of :data:`RUN_MEASURES` over a method's runs, seed by seed (:func:`spread`)."""
    return {k: spread([f(r) for r in runs]) for k, f in RUN_MEASURES.items()}


def _composition_change(composition: dict | None) -> float | None:
    if not composition or composition["second"]["onset"] is None:
        return None
    by = {row["composition"]: row for row in composition["rows"]}
    circle = by["both"]["circle_layout_iou"] - by["first alone"]["circle_layout_iou"]
    shape = by["both"]["shape_layout_iou"] - by["second alone"]["shape_layout_iou"]
    return (circle + shape) / 2


def summarize_methods(
    names: Sequence[str] = tuple(METHODS_COMPARED),
    seeds: Sequence[int] = SEEDS,
    root: str | Path = "runs/methods",
    command: str = "",
) -> dict:
    """Measure every finished run and gather them: per method its settings, trainable
    parameters, runs (seed by seed) and aggregate over seeds. A method not finished on every
    seed is left out and listed under ``not_run`` with the commands that make its runs."""
    _check(names, seeds)
    done = [n for n in names if all(finished(n, s, root) for s in seeds)]
    result: dict = {
        "command": command,
        "profile": "quick",
        "settings": {n: METHODS_COMPARED[n] for n in names},
        "seeds": list(seeds),
        "methods": {},
        "not_run": {n: [train_command(n, s, root) for s in seeds] for n in names if n not in done},
    }
    missing = [
        train_command(n, s, root, SECOND_TASK)
        for n in names
        if n in COMPOSING
        for s in seeds
        if not finished(n, s, root, second=True)
    ]
    if missing:  # the composition is reported where every seed has its second control
        result["not_run"]["second controls"] = missing
    if not done:
        return result
    pipe = load_base(method_config(done[0], seeds[0], root).base)
    fine_tune = load_base(TRANSFER_BASE) if Path(TRANSFER_BASE).exists() else None
    for name in done:
        runs = [
            measure_method_run(method_config(name, s, root).out, pipe, fine_tune) for s in seeds
        ]
        composed = name in COMPOSING and all(finished(name, s, root, second=True) for s in seeds)
        for run in runs:  # each seed's composition with its second control, where it has one
            run["composition"] = (
                measure_composition(name, run["seed"], root, pipe) if composed else None
            )
        result["methods"][name] = {
            "runs": runs,
            "aggregate": aggregate_runs(runs),
            "train_commands": [train_command(name, s, root) for s in seeds],
            "trainable_parameters": runs[0]["trainable_parameters"],
        }
    return result


#: The bench's measurement of the methods' step and sampling (``python -m cnet bench --suites
#: method_cost --out bench/results``), which the summary quotes.
COST_FROM = "bench/results/method_cost.json"


def compare_methods(
    names: Sequence[str] = tuple(METHODS_COMPARED),
    seeds: Sequence[int] = SEEDS,
    root: str | Path = "runs/methods",
    train_runs: bool = True,
    command: str = "",
    cost_from: str | Path | None = COST_FROM,
) -> dict:
    """Train what is missing (unless not ``train_runs``), then :func:`summarize_methods`, with
    the bench's step and sampling cost (its JSON at ``cost_from``, where there is one) as
    ``cost``."""
    _check(names, seeds)
    if train_runs:
        run_methods(names, seeds, root)
    result = summarize_methods(names, seeds, root, command)
    if cost_from is None or not Path(cost_from).is_file():
        return result
    record = json.loads(Path(cost_from).read_text())
    keep = ("suite", "command", "date", "machine")
    result["cost"] = cost = {**{k: record[k] for k in keep}, **record["results"]}
    if "controlnet" in result["methods"]:  # the arm is measured against ControlNet's time
        if train_runs:
            run_equal_time(names, seeds, root, cost)
        result["equal_time"] = summarize_equal_time(result, root, cost)
    return result


def summarize_equal_time(result: dict, root: str | Path, cost: dict) -> dict:
    """The equal-wall-time arm of the methods ``result`` summarized (those finished on every
    seed; the others are in its ``not_run``): per method its updates, the ``python -m cnet
    train`` lines of its runs, and, where every seed's run is finished and is not the method's
    own run, the runs measured (:func:`measure_method_run`) and aggregated as
    :func:`summarize_methods` does; a method whose run is its own is marked ``same_runs`` (its
    entry in ``methods``); ``not_run``: the commands of unfinished runs, or why there are
    none."""
    seeds = result["seeds"]
    arm: dict = {"steps": {}, "methods": {}, "not_run": {}}
    pipe = fine_tune = None
    for name in result["methods"]:
        if name not in cost["step_time_ratio"]:
            arm["not_run"][name] = "the bench has no step time for it"
            continue
        configs = [equal_time_config(name, s, root, cost) for s in seeds]
        arm["steps"][name] = configs[0].steps
        commands = [equal_time_command(name, s, root, cost) for s in seeds]
        if configs[0].steps == method_config(name, seeds[0], root).steps:
            arm["methods"][name] = {"same_runs": True, "train_commands": commands}
            continue
        if not all(run_finished(c) for c in configs):
            arm["not_run"][name] = commands
            continue
        if pipe is None:
            pipe = load_base(configs[0].base)
            fine_tune = load_base(TRANSFER_BASE) if Path(TRANSFER_BASE).exists() else None
        runs = [measure_method_run(c.out, pipe, fine_tune) for c in configs]
        arm["methods"][name] = {
            "runs": runs,
            "aggregate": aggregate_runs(runs),
            "train_commands": commands,
        }
    return arm


def equal_time_runs(result: dict) -> dict:
    """The equal-wall-time arm in the shape of ``result`` (``methods``: name → runs, aggregate,
    trainable parameters), each method's own runs standing in where they are its arm's, so the
    same tables and paired comparisons read it; methods not yet run are left out."""
    arm = result["equal_time"]
    methods = {}
    for name, entry in arm["methods"].items():
        own = result["methods"][name]
        methods[name] = own if entry.get("same_runs") else {**own, **entry}
    return {**result, "methods": methods, "steps": arm["steps"]}
