"""The benchmarks, each a set of ratios measured side by side in one run.

* :func:`step_cost`: a ControlNet step against fine-tuning the whole U-Net (the paper's cost
  claim, ICCV §3.2: +34 % time and +23 % memory per step on one A100).
* :func:`loop_cost`: cnet's loop, which caches latents and text embeddings once, against a
  loop in the style of diffusers' ``train_controlnet.py``, which runs the VAE and the text
  encoder on every step.
* :func:`scaling`: how a ControlNet step's time grows with batch size and resolution.
* :func:`loop_overheads`: what the real training step (:mod:`cnet.train.loop`) spends outside
  the model: drawing the batch from the cache, and the per-step log of norms.
* :func:`variant_cost`: the real training step of the paper's ablations (other connections,
  ControlNet-lite) against the ControlNet's.
* :func:`sampling_cost`: a sampling step with the condition encoded at every step (diffusers'
  pipeline) against encoded once before the loop (:func:`cnet.sample.sample`).
* :func:`step_speedups`: what the quick profile's real training step gains from channels-last
  memory, ``torch.compile`` (and what compiling costs) and a second thread.
* :func:`method_cost`: the real training step of ControlNet and of the methods that followed it
  (:mod:`cnet.experiments.methods`), its peak memory, and sampling with each against the base.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch
from diffusers import DDPMScheduler

from ..train import TrainConfig, draw_batch, load_base
from .measure import interleaved_times, peak_memory, ratio
from .workloads import (
    Batch,
    Step,
    controlnet_step,
    finetune_step,
    make_batch,
    sd15_text_encoder,
    sd15_unet,
    sd15_vae,
)

__all__ = [
    "loop_cost",
    "loop_overheads",
    "method_cost",
    "sampling_cost",
    "scaling",
    "step_cost",
    "step_speedups",
    "variant_cost",
]


def _median_ms(times: list[float]) -> float:
    return round(1000 * sorted(times)[len(times) // 2], 2)


def _unet(workload: dict, device: torch.device):
    if workload["unet"] == "miniature":
        return load_base(workload.get("base", TrainConfig.base)).unet.to(device)
    return sd15_unet(workload["width"], workload["latent_size"]).to(device)


def step_cost(workload: dict, repeats: int, device: torch.device) -> dict:
    """ControlNet step / fine-tuning step: time (ratio of medians) and peak tensor memory; and
    the condition encoder's forward and backward alone, the part of a ControlNet step that runs
    at the image's resolution rather than the latents'."""
    batch = make_batch(
        _unet(workload, device),
        workload["batch"],
        workload["latent_size"],
        workload.get("text_length", 77),
        device,
    )
    steps = {
        "controlnet": controlnet_step(_unet(workload, device), batch),
        "finetune": finetune_step(_unet(workload, device), batch),
    }
    hint = steps["controlnet"].modules[0].controlnets[0].hint_encoder
    times = interleaved_times(
        {
            **{k: s.run for k, s in steps.items()},
            "condition_encoder": lambda: hint(batch.condition).sum().backward(),
        },
        repeats,
        1,
        device,
    )
    memory = {
        k: peak_memory(s.run, s.modules, s.optimizer, device, extra=list(batch.as_dict().values()))
        for k, s in steps.items()
    }
    locked = sum(p.numel() for p in steps["finetune"].modules[0].parameters())
    return {
        "workload": workload,
        "unet_parameters": locked,
        "trainable_parameters": {k: s.trainable_parameters for k, s in steps.items()},
        "step_ms": {k: _median_ms(t) for k, t in times.items()},
        "times_s": times,
        "peak_bytes": memory,
        "time_ratio": ratio(times, "controlnet", "finetune"),
        "condition_encoder_share": ratio(times, "condition_encoder", "controlnet"),
        "memory_ratio": memory["controlnet"] / memory["finetune"],
    }


def _per_step_encoding(
    step: Step, vae, text_encoder, images: torch.Tensor, input_ids: torch.Tensor, batch: Batch
) -> Step:
    """The same step preceded by what a diffusers-style loop does on every step: the VAE encodes
    the batch's images and the text encoder its prompts (no gradients through either)."""
    scaling = vae.config.scaling_factor

    def run() -> float:
        with torch.no_grad():
            batch.latents = vae.encode(images).latent_dist.sample() * scaling
            batch.embeddings = text_encoder(input_ids)[0]
        return step.run()

    return replace(step, run=run, modules=[*step.modules, vae, text_encoder])


def loop_cost(workload: dict, repeats: int, device: torch.device) -> dict:
    """Samples per second of the cached loop and of the per-step-encoding loop, on the same
    model and batch; SD's VAE at ``resolution`` and SD1.5's text encoder (random weights)."""
    resolution, n = workload["resolution"], workload["batch"]
    if workload["unet"] == "miniature":  # the shipped base's own VAE and text encoder
        pipe = load_base(workload.get("base", TrainConfig.base), device)
        unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    else:
        unet = sd15_unet(workload["width"], resolution // 8).to(device)
        vae, text = sd15_vae().to(device).eval(), sd15_text_encoder().to(device).eval()
    for part in (vae, text):
        part.requires_grad_(False)
    length = text.config.max_position_embeddings
    batch = make_batch(unet, n, resolution // 8, length, device)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
    input_ids = torch.randint(0, text.config.vocab_size, (n, length), generator=g).to(device)
    cached = controlnet_step(unet, batch)
    encoding = _per_step_encoding(cached, vae, text, images, input_ids, batch)
    times = interleaved_times(
        {"cached": cached.run, "per_step_encoding": encoding.run}, repeats, 1, device
    )
    encode_only = interleaved_times(
        {"vae_and_text": lambda: _encode_only(vae, text, images, input_ids)}, repeats, 1, device
    )
    return {
        "workload": workload,
        "step_ms": {k: _median_ms(t) for k, t in times.items()},
        "encode_ms": _median_ms(encode_only["vae_and_text"]),
        "times_s": times,
        "samples_per_s": {k: n * 1000 / _median_ms(t) for k, t in times.items()},
        "speedup": ratio(times, "per_step_encoding", "cached"),
    }


@torch.no_grad()
def _encode_only(vae, text_encoder, images, input_ids) -> None:
    vae.encode(images).latent_dist.sample()
    text_encoder(input_ids)


def scaling(
    workload: dict, batches: list[int], latent_sizes: list[int], repeats: int, device: torch.device
) -> dict:
    """ControlNet step time against batch size (at the workload's latent size) and against
    latent size (at its batch), each point relative to the first."""

    def times_for(batch_size: int, latent_size: int) -> float:
        unet = sd15_unet(workload["width"], latent_size).to(device)
        step = controlnet_step(unet, make_batch(unet, batch_size, latent_size, 77, device))
        return _median_ms(interleaved_times({"s": step.run}, repeats, 1, device)["s"])

    by_batch = {b: times_for(b, workload["latent_size"]) for b in batches}
    by_size = {s: times_for(workload["batch"], s) for s in latent_sizes}
    return {
        "workload": workload,
        "batch": {
            "sizes": batches,
            "step_ms": list(by_batch.values()),
            "relative": [t / by_batch[batches[0]] for t in by_batch.values()],
        },
        "latent_size": {
            "sizes": latent_sizes,
            "step_ms": list(by_size.values()),
            "relative": [t / by_size[latent_sizes[0]] for t in by_size.values()],
        },
    }


def loop_overheads(config: TrainConfig, repeats: int) -> dict:
    """On the real training step of the shipped base: the share of a step spent drawing its
    batch from the cache, and what logging every step's norms costs against not logging."""
    from ..train.loop import FIRST_STEPS_LOGGED, Trainer

    with tempfile.TemporaryDirectory() as out:
        config = replace(config, out=out, eval_every=0, resume=False)
        trainer = Trainer(config)
        trainer.load_data()
        scheduler = DDPMScheduler.from_config(trainer.pipe.scheduler.config)
        steps = iter(range(FIRST_STEPS_LOGGED, 10**9))
        times = interleaved_times(
            {
                "draw_batch": lambda: draw_batch(trainer.data, config, 0, 0, scheduler),
                "step_logged": lambda: trainer.step(next(steps), log=True),
                "step_unlogged": lambda: trainer.step(next(steps), log=False),
            },
            repeats,
            1,
            trainer.device,
        )
        trainer.close()
    return {
        "config": {k: getattr(config, k) for k in ("base", "batch_size", "train_size")},
        "step_ms": {k: _median_ms(t) for k, t in times.items()},
        "times_s": times,
        "data_share": ratio(times, "draw_batch", "step_unlogged"),
        "logging_ratio": ratio(times, "step_logged", "step_unlogged"),
    }


def variant_cost(config: TrainConfig, variants: dict[str, dict], repeats: int) -> dict:
    """The real training step (:mod:`cnet.train.loop`) of each of the paper's ablations
    (``variants``: name → settings on top of ``config``, e.g. ``{"trainable_copy": "lite"}``),
    timed in turn; ratios against the first. Also each one's trainable parameter count."""
    from ..train.loop import FIRST_STEPS_LOGGED, Trainer

    trainers, calls, parameters = {}, {}, {}
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in variants.items():
            variant = replace(
                config,
                **overrides,
                out=f"{out}/{len(trainers)}",
                eval_every=0,
                resume=False,
                train_size=min(config.train_size, 256),
            )
            trainer = trainers[name] = Trainer(variant)
            trainer.load_data()
            steps = iter(range(FIRST_STEPS_LOGGED, 10**9))
            calls[name] = lambda trainer=trainer, steps=steps: trainer.step(next(steps))
            parameters[name] = sum(
                p.numel() for p in trainer.trained.parameters() if p.requires_grad
            )
        times = interleaved_times(calls, repeats, 1, next(iter(trainers.values())).device)
        for trainer in trainers.values():
            trainer.close()
    first = next(iter(variants))
    return {
        "config": {k: getattr(config, k) for k in ("base", "batch_size", "grad_accum")},
        "variants": variants,
        "trainable_parameters": parameters,
        "step_ms": {k: _median_ms(t) for k, t in times.items()},
        "times_s": times,
        "time_ratio": {k: ratio(times, k, first) for k in variants},
    }


def sampling_cost(workload: dict, repeats: int, device: torch.device) -> dict:
    """One denoising step of the shipped base with a ControlNet, under classifier-free guidance
    (2 × ``batch`` rows): the condition encoded at the step, as diffusers' pipeline does, against
    encoded once before the loop (:meth:`cnet.ControlNet.encode_condition`); the encoding alone;
    and whether the two steps predict the same noise, bit for bit."""
    from ..injection import ControlledUNet
    from ..train import load_controlnet

    pipe = load_base(workload.get("base", TrainConfig.base))
    net = load_controlnet(workload["controlnet"])
    controlled = ControlledUNet(pipe.unet, net).to(device).eval()
    n, size, g = 2 * workload["batch"], pipe.unet.config.sample_size, torch.Generator()
    x = torch.randn(n, pipe.unet.config.in_channels, size, size, generator=g.manual_seed(0))
    condition = torch.rand(
        n,
        net.condition_channels,
        net.downscale_factor * size,
        net.downscale_factor * size,
        generator=g,
    ).to(device)
    text = pipe.encode_prompt(["red circle with blue background"] * n, device, 1, False)[0]
    x, encoded = x.to(device), net.encode_condition(condition)
    calls = {
        "encoded_each_step": lambda: controlled(x, 500, text, condition),
        "encoded_once": lambda: controlled(x, 500, text, encoded),
        "encoding": lambda: net.encode_condition(condition),
    }
    with torch.no_grad():
        same = torch.equal(calls["encoded_each_step"](), calls["encoded_once"]())
        times = interleaved_times(calls, repeats, 1, device)
    return {
        "workload": workload,
        "step_ms": {k: _median_ms(t) for k, t in times.items()},
        "times_s": times,
        "bit_for_bit": same,
        "time_ratio": ratio(times, "encoded_once", "encoded_each_step"),
    }


def step_speedups(config: TrainConfig, repeats: int, compile_step: bool = True) -> dict:
    """The real training step (:meth:`cnet.train.loop.Trainer.step`) at ``config`` (the quick
    profile's batch and recipe), as the loop runs it, against the same step with: the base and
    the ControlNet in channels-last memory (the ``channels_last`` setting); the controlled U-Net
    under ``torch.compile`` (inductor; the first compiled call, which compiles into an empty
    cache, is timed on its own); and, where the run has more threads, the plain trainer's step on
    one thread. Each layout and compilation is its own trainer from the same seed; all are timed
    in turn.

    ``break_even_steps``: how many steps the compiled step needs before its saving has paid
    for the compilation (None where it saves nothing)."""
    from ..train.loop import FIRST_STEPS_LOGGED, Trainer

    threads = torch.get_num_threads()
    result: dict = {"config": {k: getattr(config, k) for k in ("base", "batch_size", "lr")}}
    with tempfile.TemporaryDirectory() as out:
        config = replace(config, out=out, eval_every=0, resume=False)
        ways = ["plain", "channels_last"] + (["compiled"] if compile_step else [])
        trainers, calls = {}, {}
        for i, way in enumerate(ways):
            layout = {"channels_last": way == "channels_last"}
            trainer = trainers[way] = Trainer(replace(config, **layout, out=f"{out}/{i}"))
            trainer.load_data()
            steps = iter(range(FIRST_STEPS_LOGGED, 10**9))
            calls[way] = lambda trainer=trainer, steps=steps: trainer.step(next(steps), log=False)
        # compiled into an empty cache, as on a fresh machine: inductor keeps what it compiled
        # on disk, and a second process would pay a small part of it
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{out}/inductor"
        try:
            if compile_step:
                compiled = trainers["compiled"]
                compiled.model = torch.compile(compiled.model)
                start = time.perf_counter()
                calls["compiled"]()
                result["compile_s"] = round(time.perf_counter() - start, 1)
            if threads > 1:  # the plain trainer's step, on one thread
                calls["one_thread"] = lambda: _on_threads(1, calls["plain"])
            times = interleaved_times(calls, repeats, 1, trainers["plain"].device)
        finally:
            for trainer in trainers.values():
                trainer.close()
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            if cache is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    result.update(
        threads=threads,
        step_ms={k: _median_ms(t) for k, t in times.items()},
        times_s=times,
        time_ratio={k: ratio(times, k, "plain") for k in times},
    )
    if compile_step:
        saved = statistics.median(times["plain"]) - statistics.median(times["compiled"])
        result["break_even_steps"] = round(result["compile_s"] / saved) if saved > 0 else None
    return result


def _on_threads(threads: int, call):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return call()
    finally:
        torch.set_num_threads(before)


def method_cost(methods: dict[str, TrainConfig], repeats: int, sampled: int = 8) -> dict:
    """For each method (``methods``: name → the settings of its run): the real training step
    (:meth:`cnet.train.loop.Trainer.step`, with its optimizer update) and its peak tensor memory,
    and sampling ``sampled`` images (10 guided DDIM steps, the quick evaluation's sampler) with
    the untrained method, against the same with the base alone; all timed in turn, ratios
    against the first method's step and against the base's sampling."""
    from ..sample import sample
    from ..train.loop import FIRST_STEPS_LOGGED, Trainer

    trainers, steps, sampling, parameters, memory = {}, {}, {}, {}, {}
    prompts = ["red circle with blue background"] * sampled
    with tempfile.TemporaryDirectory() as out:
        for i, (name, config) in enumerate(methods.items()):
            config = replace(config, out=f"{out}/{i}", eval_every=0, resume=False)
            trainer = trainers[name] = Trainer(config)
            trainer.load_data()
            numbers = iter(range(FIRST_STEPS_LOGGED, 10**9))
            steps[name] = lambda t=trainer, n=numbers: t.step(next(n), log=False)
            steps[name]()  # the optimizer's state exists, as in every step but the first
            # what the step holds: the controlled U-Net (a ControlNet-XS's fused one holds its
            # own copy of the base; the concatenation's holds the VAE it encodes with)
            memory[name] = peak_memory(
                steps[name], [trainer.controlled], trainer.optimizer, trainer.device
            )
            parameters[name] = sum(
                p.numel() for p in trainer.trained.parameters() if p.requires_grad
            )
            conditions = trainer.eval_data.condition[:sampled]
            sampling[name] = lambda t=trainer, c=conditions: sample(
                t.pipe,
                t.sampled.eval(),
                prompts,
                c,
                10,
                3.0,
                generator=torch.Generator().manual_seed(0),
            )
        first = next(iter(trainers.values()))
        sampling["base"] = lambda: sample(
            first.pipe, None, prompts, None, 10, 3.0, generator=torch.Generator().manual_seed(0)
        )
        step_times = interleaved_times(steps, repeats, 1, first.device)
        with torch.no_grad():
            sample_times = interleaved_times(sampling, repeats, 1, first.device)
        for trainer in trainers.values():
            trainer.close()
    reference = next(iter(methods))
    return {
        "config": {k: getattr(methods[reference], k) for k in ("base", "batch_size")},
        "methods": list(methods),
        "trainable_parameters": parameters,
        "step_ms": {k: _median_ms(t) for k, t in step_times.items()},
        "step_times_s": step_times,
        "step_time_ratio": {k: ratio(step_times, k, reference) for k in methods},
        "peak_memory_bytes": memory,
        "memory_ratio": {k: memory[k] / memory[reference] for k in methods},
        "sampled": sampled,
        "sampling_ms": {k: _median_ms(t) for k, t in sample_times.items()},
        "sampling_times_s": sample_times,
        "sampling_ratio": {k: ratio(sample_times, k, "base") for k in sampling},
    }
