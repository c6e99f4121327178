r"""Training a ControlNet on a locked base (ICCV §3.3).

    python -m cnet train                               # quick profile on CPU, full on CUDA
    python -m cnet train --profile full --steps 8000 --lr 3e-4 --out runs/fill-full

What happens, and why:

* **Locked base.** VAE, text encoder and U-Net are frozen (no gradients, no optimizer state,
  eval mode). Only the ControlNet trains, with AdamW, as in the released ``cldm.py``
  (``configure_optimizers``). ``sd_locked=False`` also trains the U-Net's decoder (its up blocks
  and output layers) at ``decoder_lr_scale`` × the learning rate; the encoder never trains.
* **Loss.** The standard ε-prediction loss of the base (DDPM forward process at a timestep drawn
  as ``timesteps`` says: uniformly, as SD and the released code train, or cubically toward the
  noisy end, :func:`cnet.train.data.draw_timesteps`),
  :math:`\lVert \epsilon - \epsilon_\theta(z_t, t, c_t, c_f) \rVert^2`.
* **Empty prompts.** ``empty_prompt_ratio`` (0.5 by default, the paper's choice) of the prompts
  are replaced by the empty string, so the ControlNet learns to read the condition itself.
* **Frozen work is done once** (:mod:`cnet.train.data`): latent distributions and text
  embeddings are cached before the first step.
* **Exact resume** (:mod:`cnet.train.runs`): every random draw of step ``k`` comes from a
  generator seeded with ``(seed, k)``; a checkpoint holds the weights, the optimizer state and
  ``k``. A resumed CPU run equals the uninterrupted one, bit for bit. A non-finite loss stops
  the run and leaves the last good checkpoint; Ctrl-C saves first.
* **Engine** (:mod:`cnet.train.engine`): accelerate places the run, autocasts to the chosen
  precision (with loss scaling for fp16), accumulates gradients and, under torchrun or
  ``accelerate launch``, averages them over processes, each of which computes its slice of
  every micro-batch; the main process alone writes and evaluates.
* **Logged.** Every ``log_every`` steps (and each of the first ten): the loss, each zero
  convolution's weight norm and gradient norm, the trainable copy's gradient norm. Every
  ``eval_every`` steps: condition fidelity on a fixed evaluation set
  (:func:`cnet.train.evaluate.evaluate`). One JSON object per line in ``log.jsonl``.

* **Watched** (:mod:`cnet.train.watch`): the best evaluation's weights are kept in
  ``best.safetensors``; fidelity fallen back toward the base's after it rose, or a loss spike, is
  reported in one line above the progress bar and in the log.

The recipe (:mod:`cnet.experiments.recipe`, ``figures/recipe_study.json``; the released tutorial
trains SD1.5 at lr 1e-5, batch 4). The quick profile before the study (600 steps of batch 16 at
2e-3, uniform timesteps) started on 1 seed of 3 and collapsed on 2 of 3 at 1200 steps. At the
same 12,800 samples, batch 32 at 2e-3 with cubic timesteps started on 5 of 5 seeds on one thread
(at 1e-3: 2 of 5) and on 9 of 10 on two (steps 150-350; seed 5 not within 400), none collapsed
at 2x its steps, final IoU median 0.79 (one thread) and 0.69 (two; 0.84 at 2x): the quick
profile. Uniform timesteps and a decaying rate at this budget were not run, so the share of
cubic sampling vs batch is undecided. The full profile is unchanged and has not been run over
seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..controlnet import ControlNet
from ..injection import ControlledUNet
from .config import SettingError, TrainConfig
from .data import CachedData, build_controlnet, cache_data, draw_batch, load_base
from .engine import checkpoint_trainable_copy, make_accelerator, process_share
from .evaluate import evaluate, validate, validation_grid
from .folders import folder_data
from .norms import logged_norms
from .optim import make_optimizer, make_schedule
from .runs import (
    check_resumable,
    checkpoint_metadata,
    checkpoint_wall_time,
    finite_or_none,
    load_checkpoint,
    save_checkpoint,
    truncate_log,
)
from .watch import RunWatch

__all__ = [
    "FIRST_STEPS_LOGGED",
    "TrainingDiverged",
    "diffusion_loss",
    "train",
]

# The first steps are always logged, whatever ``log_every``: they hold Eq. 6 and Eq. 8 (the
# trainable copy's gradient is exactly zero at step 1 and non-zero from step 2).
FIRST_STEPS_LOGGED = 10

# Settings a run may change when it resumes (where it runs, how long it goes on, how often it
# saves): none of them changes what the steps already taken compute.
# Gradient checkpointing recomputes the same activations, so it may change too.
RESUMABLE_CHANGES = ("out", "resume", "device", "steps", "checkpoint_every",
                     "gradient_checkpointing")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


# ------------------------------------------------------------------------------------------
# The loss and what is logged
# ------------------------------------------------------------------------------------------


def diffusion_loss(controlled: ControlledUNet, batch: dict, noise_scheduler: DDPMScheduler,
                   scaling_factor: float) -> torch.Tensor:
    r"""The ε-prediction loss with control: :math:`\lVert \epsilon - \epsilon_\theta(z_t, t, c_t,
    c_f)\rVert^2`, :math:`z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`
    (diffusers' ``DDPMScheduler.add_noise``), :math:`z_0` the VAE latent times the VAE's
    ``scaling_factor``, as Stable Diffusion was trained. A base that predicts another target
    (its scheduler's ``prediction_type``: SD2's v-prediction) regresses that one instead."""
    z0 = batch["latents"] * scaling_factor
    zt = noise_scheduler.add_noise(z0, batch["noise"], batch["timesteps"])
    prediction = controlled(zt, batch["timesteps"], batch["embeddings"], batch["condition"])
    return F.mse_loss(prediction.float(), _target(noise_scheduler, z0, batch).float())


def _target(noise_scheduler: DDPMScheduler, z0: torch.Tensor, batch: dict) -> torch.Tensor:
    r"""What the base predicts, by its scheduler's ``prediction_type``: the noise (SD1.x), the
    velocity :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\, z_0`
    (SD2's 768 px models), or the clean latent."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return batch["noise"]
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(z0, batch["noise"], batch["timesteps"])
    if kind == "sample":
        return z0
    raise SettingError(f"base: prediction_type {kind!r} is not allowed; expected epsilon, "
                       "v_prediction or sample")


# ------------------------------------------------------------------------------------------
# Setting a run up
# ------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one training invocation works with."""

    config: TrainConfig
    out: Path
    accelerator: Accelerator
    pipe: StableDiffusionPipeline
    controlnet: ControlNet
    controlled: ControlledUNet  # the module itself, for sampling
    model: torch.nn.Module  # the same, as accelerate prepared it (DDP-wrapped in several processes)
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer  # accelerate's wrapper: loss scaling, accumulation
    schedule: torch.optim.lr_scheduler.LambdaLR  # the learning rate by update (lr_factor)
    trainable: dict[str, torch.nn.Module]
    start: int  # the step this invocation starts from
    earlier_wall_time: float  # training time behind the checkpoint it resumed from
    on_log: Callable[[dict], None] | None = None
    on_update: Callable[[int, ControlNet], None] | None = None  # sees gradients, pre-update
    data: CachedData | None = None
    eval_data: CachedData | None = None
    samples: dict | None = None
    log_file: TextIO | None = None
    started: float = 0.0  # perf_counter() when this invocation's training began
    watch: RunWatch | None = None  # best weights and collapse alerts (main process)

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.safetensors"

    @property
    def metric(self) -> str:
        """What an evaluation measures: exact IoU in the world, edge F1 on a folder's pairs."""
        return "edge_f1" if self.config.data else "iou"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        """The process that writes: checkpoints, logs, samples (one writer, so nothing is
        written twice or half)."""
        return self.accelerator.is_main_process

    def wall_time(self) -> float:
        return self.earlier_wall_time + time.perf_counter() - self.started

    def save(self, step: int, wait: bool = True) -> None:
        if self.main:
            scaler = self.accelerator.scaler
            save_checkpoint(self.checkpoint, self.trainable, self.optimizer, step,
                            dataclasses.asdict(self.config), self.wall_time(),
                            extra={"grad_scaler": scaler.state_dict()} if scaler else None)
        if wait:  # no process runs ahead of a checkpoint it might be killed before
            self.accelerator.wait_for_everyone()

    def log(self, entry: dict) -> None:
        if not self.main:
            return
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()
        if self.on_log is not None:
            self.on_log(entry)


def _setup(config: TrainConfig) -> _Run:
    """Load the base, build the ControlNet and optimizer, restore the checkpoint if resuming,
    and hand model and optimizer to accelerate."""
    config.check()
    accelerator = make_accelerator(config)
    device = accelerator.device
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.safetensors"
    resuming = config.resume and checkpoint.exists()
    if resuming:
        check_resumable(checkpoint, dataclasses.asdict(config), config.steps, RESUMABLE_CHANGES,
                        defaults=dataclasses.asdict(TrainConfig()))
    torch.manual_seed(config.seed)
    pipe = load_base(config.base, device)
    controlnet = build_controlnet(pipe, config).to(device)
    if config.gradient_checkpointing:
        checkpoint_trainable_copy(controlnet)
    controlled = ControlledUNet(pipe.unet, controlnet).train()
    optimizer = make_optimizer(controlnet, pipe.unet, config, device)
    trainable = {"controlnet": controlnet}
    if not config.sd_locked:
        trainable["unet"] = pipe.unet
    start = load_checkpoint(checkpoint, trainable, optimizer) if resuming else 0
    schedule = make_schedule(optimizer, config, start)
    model, optimizer = accelerator.prepare(controlled, optimizer)
    scaler_state = checkpoint_metadata(checkpoint).get("grad_scaler") if start > 0 else None
    if accelerator.scaler is not None and scaler_state:
        accelerator.scaler.load_state_dict(json.loads(scaler_state))
    return _Run(config, out, accelerator, pipe, controlnet, controlled, model,
                DDPMScheduler.from_config(pipe.scheduler.config), optimizer, schedule,
                trainable, start, checkpoint_wall_time(checkpoint) if start > 0 else 0.0)


def _load_data(run: _Run) -> None:
    config = run.config
    if config.data:  # a folder: the main process caches it to disk, the others read that
        if run.main:
            run.data, run.eval_data = folder_data(run.pipe, config, run.out / "cache")
        run.accelerator.wait_for_everyone()
        if not run.main:
            run.data, run.eval_data = folder_data(run.pipe, config, run.out / "cache")
    else:
        run.data = cache_data(run.pipe, config.task, config.train_size, "train", config.seed)
        run.eval_data = cache_data(run.pipe, config.task, config.eval_size, "eval",
                                   config.seed)
    if not run.main:
        return
    truncate_log(run.out / "log.jsonl", run.start)
    run.log_file = (run.out / "log.jsonl").open("a")
    run.watch = RunWatch(run.out, run.metric)
    run.watch.restore(run.start)
    samples_path = run.out / "samples.safetensors"
    run.samples = {}
    if run.start > 0 and samples_path.exists():  # keep what the checkpoint's weights produced
        run.samples = {k: v for k, v in load_file(samples_path).items()
                       if int(k.split("_")[1]) <= run.start}


# ------------------------------------------------------------------------------------------
# One step, one evaluation
# ------------------------------------------------------------------------------------------


def _train_step(run: _Run, step: int) -> tuple[float, dict | None]:
    """One optimizer step (``grad_accum`` micro-batches, each split across the processes).
    Returns the loss and the log entry of the step, measured before the update (so step 0
    shows the zero convolutions at exactly 0), or None where this step is not logged."""
    config, accelerator = run.config, run.accelerator
    run.optimizer.zero_grad(set_to_none=False)
    scaling = run.pipe.vae.config.scaling_factor
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(config.grad_accum):
        batch = process_share(draw_batch(run.data, config, step, micro, run.noise_scheduler),
                              accelerator)
        # accelerate: autocast (in the prepared model), loss / grad_accum, loss scaling, and no
        # gradient all-reduce until the last micro-batch
        with accelerator.accumulate(run.model):
            loss = diffusion_loss(run.model, batch, run.noise_scheduler, scaling)
            accelerator.backward(loss)
        loss_sum += loss.detach() / config.grad_accum
    loss_value = accelerator.reduce(loss_sum, "mean").item()  # every process agrees on it
    if not math.isfinite(loss_value):
        raise TrainingDiverged(
            f"loss is {loss_value} at step {step}; stopped, the last good "
            f"checkpoint ({run.checkpoint}) is kept. Try a lower --lr."
        )
    entry = None
    if step < FIRST_STEPS_LOGGED or step % config.log_every == 0:
        accelerator.unscale_gradients()  # fp16: the norms logged are the true gradients'
        entry = {"step": step, "loss": loss_value, **logged_norms(run.controlnet)}
    if run.on_update is not None:
        run.on_update(step, run.controlnet)
    scaler = accelerator.scaler
    scale = scaler.get_scale() if scaler is not None else None
    run.optimizer.step()
    run.schedule.step()  # also after an fp16 update skipped for overflow (cnet.train.optim)
    # fp16: the gradients overflowed, the update was skipped and the scale lowered (read from
    # the scale, since fused AdamW skips inside its kernel and accelerate does not see it)
    if entry is not None and scaler is not None and scaler.get_scale() < scale:
        entry["update_skipped"] = True
    return loss_value, entry


def _evaluate(run: _Run, step: int) -> dict:
    """Fidelity on the evaluation set (a folder's: its validation, :func:`validate`), measured
    by the main process; its images are kept in ``samples.safetensors`` and drawn under their
    conditions in ``validation/step_<k>.png``."""
    metrics = {}
    if run.main:
        run.controlled.eval()
        measure = validate if run.config.data else evaluate
        metrics, images = measure(run.pipe, run.controlled, run.eval_data,
                                  run.config.eval_steps, run.config.guidance_scale)
        run.controlled.train()
        conditions = run.eval_data["condition"] if run.config.data else run.eval_data.condition
        (run.out / "validation").mkdir(exist_ok=True)
        validation_grid(conditions, images).save(run.out / "validation" / f"step_{step:06d}.png")
        run.samples[f"step_{step}"] = ((images + 1) * 127.5).round().to(torch.uint8).contiguous()
        path = run.out / "samples.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(run.samples, tmp)
        tmp.replace(path)
        run.log({"step": step, "eval": metrics})
        run.watch.evaluated(step, metrics, run.trainable)
    run.accelerator.wait_for_everyone()
    return metrics


def _last_evaluation(run: _Run) -> dict:
    """The evaluation the run's current weights last had: a fresh one at step 0, else the
    log's last one, until the next evaluation."""
    if run.start == 0:
        return _evaluate(run, 0) if run.config.eval_every > 0 else {}
    if not run.main:  # the main process may be rewriting the log (truncate_log)
        return {}
    lines = (run.out / "log.jsonl").read_text().splitlines()
    evals = [json.loads(line)["eval"] for line in lines if '"eval"' in line]
    return evals[-1] if evals else {}


def _run_steps(run: _Run) -> dict:
    """Steps from ``run.start`` to the end, with logging, evaluation and checkpoints; Ctrl-C
    saves a checkpoint first. Returns the last evaluation."""
    config = run.config
    last_eval = _last_evaluation(run)
    completed = run.start  # optimizer steps taken so far
    # redrawn at most once a second: in a notebook every redraw is a widget message, and a
    # flood of them can outrun the kernel's output channel (nbval then loses the cell's end)
    bar = tqdm(range(run.start, config.steps), initial=run.start, total=config.steps,
               desc="train", dynamic_ncols=True, mininterval=1.0, disable=not run.main)
    try:
        for step in bar:
            loss, entry = _train_step(run, step)
            completed = step + 1
            if entry is not None:
                run.log(entry)
                if run.watch is not None:
                    run.watch.losses.append(entry["loss"])
            if config.eval_every > 0 and (completed % config.eval_every == 0
                                          or completed == config.steps):
                last_eval = _evaluate(run, completed)
            if completed % config.checkpoint_every == 0 or completed == config.steps:
                run.save(completed)
            for kind, line in run.watch.check(completed) if run.main else ():
                bar.write(line)
                run.log({"step": completed, "alert": line, "kind": kind})
            postfix = {"loss": f"{loss:.4f}",
                       run.metric: f"{last_eval.get(run.metric, float('nan')):.3f}"}
            if run.main and run.watch.alerts:
                postfix["alert"] = "+".join(sorted(run.watch.alerts))
            bar.set_postfix(postfix, refresh=False)
    except KeyboardInterrupt:
        run.save(completed, wait=False)  # the other processes may not have been interrupted
        print(f"\ninterrupted: saved step {completed} to {run.checkpoint}; run again to resume")
        raise
    finally:
        bar.close()
        if run.log_file is not None:
            run.log_file.close()
    return last_eval


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def train(config: TrainConfig, profile: str = "custom",
          on_log: Callable[[dict], None] | None = None,
          on_update: Callable[[int, ControlNet], None] | None = None) -> dict:
    """Train a ControlNet on the locked base ``config.base`` and return a summary (final step,
    wall time, last evaluation). Writes ``log.jsonl``, ``checkpoint.safetensors``,
    ``samples.safetensors`` (the evaluation images at each evaluation), ``config.json`` and,
    at the end, ``run.json`` (profile, device, wall time, last evaluation) to ``config.out``.
    ``on_log`` sees every log entry as it is written; ``on_update(step, controlnet)`` sees the
    ControlNet with step's gradients, just before the optimizer updates it (under fp16 they
    are unscaled on logged steps only)."""
    run = _setup(config)
    run.on_log, run.on_update = on_log, on_update
    if run.start == config.steps and (run.out / "run.json").exists():
        # a finished run: running it again must not overwrite what it measured
        print(f"{run.out} already finished {config.steps} steps; nothing to do")
        return json.loads((run.out / "run.json").read_text())
    if run.main:
        (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    _load_data(run)
    run.started = time.perf_counter()
    last_eval = _run_steps(run)
    summary = {
        "profile": profile, "device": str(run.device),
        "processes": run.accelerator.num_processes,
        "mixed_precision": run.accelerator.mixed_precision,
        "device_name": (torch.cuda.get_device_name(run.device) if run.device.type == "cuda"
                        else f"cpu, {torch.get_num_threads()} thread(s)"),
        "steps": config.steps, "resumed_from": run.start,
        # the training time behind these weights, over every invocation that produced them
        # (setup and work lost to a crash after the last checkpoint not counted)
        "wall_time_s": finite_or_none(round(run.wall_time(), 1)),
        "wall_time_this_invocation_s": round(time.perf_counter() - run.started, 1),
        "final_eval": last_eval, "config": dataclasses.asdict(config),
    }
    if run.main:
        (run.out / "run.json").write_text(json.dumps(summary, indent=2))
    return summary
