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
* **Clipped** (``max_grad_norm``; 0, never, by default): an update whose total gradient norm is
  above ``max_grad_norm`` is scaled down to it, as diffusers' script does at 1.0. The miniature's
  norm is about 0.03, so a clip at 1.0 acts only on a spike already 30 times that; the quick
  profile's 0.1 acted on 0-11 of the 400 updates per seed (ten seeds) and leaves every other
  update as it is, bit for bit (its factor is 1). The log records the norm
  a clipped update had (``clipped_from``).
* **Engine** (:mod:`cnet.train.engine`): accelerate places the run, autocasts to the chosen
  precision (with loss scaling for fp16), accumulates gradients and, under torchrun or
  ``accelerate launch``, averages them over processes, each of which computes its slice of
  every micro-batch; the main process alone writes and evaluates.
* **Logged.** Every ``log_every`` steps (and each of the first ten): the loss, each zero
  convolution's weight norm and gradient norm, the trainable copy's gradient norm. Every
  ``eval_every`` steps: condition fidelity on a fixed evaluation set
  (:func:`cnet.train.evaluation.evaluate`). One JSON object per line in ``log.jsonl``.

* **Watched** (:mod:`cnet.train.watch`): the best evaluation's weights are kept in
  ``best.safetensors``; fidelity fallen back toward the base's after it rose, or a loss spike, is
  reported in one line above the progress bar and in the log.
* **Averaged** (``ema_decay``; 0, none, by default): an exponential moving average of the
  ControlNet's weights (diffusers' ``EMAModel``, :mod:`cnet.averaging`) is updated after every
  update; it is what the evaluations sample and ``best.safetensors`` keeps, the checkpoint
  stores it beside the trained weights (``ema_controlnet.*``), and ``export``, ``sample`` and
  ``evaluate`` load it as the run's result (:func:`cnet.train.runs.result_prefix`). Neither
  the released trainer nor diffusers' ``train_controlnet.py`` keeps one for a ControlNet; the
  base's pretraining ships its own (:mod:`cnet.world.pretrain`).

The recipe (:mod:`cnet.experiments.recipe`, ``figures/recipe_study.json``; the released tutorial
trains SD1.5 at lr 1e-5, batch 4). The quick profile before the study (600 steps of batch 16 at
2e-3, uniform timesteps) started on 1 seed of 3 and collapsed on 2 of 3 at 1200 steps. At the
same 12,800 samples, batch 32 with cubic timesteps at one rate of 2e-3 started on 5 of 5 seeds
on one thread (at 1e-3: 2 of 5) but on 9 of 10 on two (seed 5 not within 400 steps, nor 800),
final IoU median 0.69 on two threads. The condition encoder and the zero convolutions start from
scratch, the copy from the base's weights: at 4e-3 with the copy at 1e-3, decaying to a tenth
over the last 100 steps, 9 of 10 started (steps 100-250) and ended above the one-rate runs, but
seed 3 diverged at step ~150 after its gradient norm (about 0.03) spiked to 0.2-8. The same with
the update clipped at a norm of 0.1 (it acted on 0-11 of 400 updates per seed) started on 10 of
10 seeds on two threads (steps 50-200) and 3 of 3 on one, ended above the one-rate runs on every
seed, median 0.83 (0.77-0.85), and none collapsed at 2x its steps (median 0.85 there). Longer
budgets in channels-last memory (a faster CPU step) ended near 0.85 too: 520 updates 0.8496, 640
0.8433, 520 decaying over its last 200 updates 0.8490 (within 0.01 of the 100-update decay on
10 of 10 seeds). 800 updates decaying over the last 300 started on 10 of 10 seeds on two threads
(steps 50-300) and on 3 of 3 on one (seeds 0-2, steps 50-150), ended above the 520-update
recipe on 10 of 10 seeds (+0.006 to +0.044), median 0.867 (0.85-0.90), in about 3.5 minutes on
two cores, and none collapsed at 2x its steps (median 0.889 there, 0.86-0.92): the quick
profile. The detector calls none of those ten jumps sudden (they come within 50-300 updates, too
soon against the run's length). Uniform timesteps at this budget were not run, so the share of
cubic sampling vs batch is undecided.
The full profile (3000 updates of batch 32 at a constant 1e-3, uniform timesteps) is unchanged:
over seeds 0-4 (figures/full_check.json) it started on 5 of 5 (updates 400-700), ended at a
median final IoU of 0.914 (0.880-0.929), and none collapsed when continued to 6000 updates
(0.904-0.930 there); the detector calls 4 of its 5 jumps sudden.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..averaging import averaged_copy
from ..controlnet import ControlNet
from .config import TrainConfig
from .data import CachedData, cache_data, draw_batch
from .engine import checkpoint_trainable_copy, make_accelerator, process_share
from .evaluation import evaluate, validate, validation_grid
from .folders import folder_data
from .loss import diffusion_loss
from .models import build_trained, controlled_by, load_base, trained_name
from .norms import logged_norms, trained_norms
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
    "RESUMABLE_CHANGES",
    "Trainer",
    "TrainingDiverged",
    "train",
]

# The first steps are always logged, whatever ``log_every``: they hold Eq. 6 and Eq. 8 (the
# trainable copy's gradient is exactly zero at step 1 and non-zero from step 2).
FIRST_STEPS_LOGGED = 10

# Settings a run may change when it resumes (where it runs, how long it goes on, how often it
# saves): none of them changes what the steps already taken compute.
# Gradient checkpointing recomputes the same activations, so it may change too; the memory
# layout changes only the rounding of the steps still to come, as another device does.
RESUMABLE_CHANGES = (
    "out",
    "resume",
    "device",
    "steps",
    "checkpoint_every",
    "gradient_checkpointing",
    "channels_last",
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


class Trainer:
    """One training run of a ControlNet (or, with ``method`` t2i-adapter, a T2I-Adapter: then
    read "adapter" for "ControlNet" below) on a locked base, built from its settings: the base
    loaded, the ControlNet (:attr:`trained`) and its optimizer built, the checkpoint in
    ``config.out`` restored when resuming, model and optimizer handed to accelerate. Then
    :meth:`load_data`, and either :meth:`run` (every step to ``config.steps``, as :func:`train`
    does) or :meth:`step`, :meth:`evaluate` and :meth:`save` one at a time (as ``bench/`` times
    a step).

    ``on_log`` sees every log entry as it is written; ``on_update(step, trained)`` sees the
    ControlNet with the step's gradients, just before the optimizer updates it."""

    def __init__(
        self,
        config: TrainConfig,
        on_log: Callable[[dict], None] | None = None,
        on_update: Callable[[int, ControlNet], None] | None = None,
    ) -> None:
        config.check()
        self.config, self.on_log, self.on_update = config, on_log, on_update
        self.accelerator = make_accelerator(config)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        resuming = config.resume and self.checkpoint.exists()
        if resuming:
            check_resumable(
                self.checkpoint,
                dataclasses.asdict(config),
                config.steps,
                RESUMABLE_CHANGES,
                defaults=dataclasses.asdict(TrainConfig()),
            )
        torch.manual_seed(config.seed)
        self.pipe = load_base(config.base, self.device)
        #: what the run trains (by method: cnet.train.models.build_trained)
        self.trained = build_trained(self.pipe, config).to(self.device)
        if config.gradient_checkpointing:
            checkpoint_trainable_copy(self.trained)
        self.controlled = controlled_by(self.pipe, self.trained).train()
        if config.channels_last:  # in place, before the optimizer holds the parameters
            # (a ControlNet-XS's fused U-Net holds its own copy of the base's weights)
            fused = getattr(self.controlled, "fused", self.trained)
            for module in (self.pipe.unet, self.trained, fused):
                module.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(self.trained, self.pipe.unet, config, self.device)
        name = trained_name(config.method)
        self.trainable: dict[str, torch.nn.Module] = {name: self.trained}
        if not config.sd_locked:
            self.trainable["unet"] = self.pipe.unet
        #: what a checkpoint stores: the modules being trained and, with ema_decay, the average
        #: of the ControlNet's weights (cnet.averaging), which is what the evaluations sample
        self.stored, self.evaluated_modules = dict(self.trainable), dict(self.trainable)
        self.averaged, self.ema = None, None
        if config.ema_decay:
            self.averaged, self.ema = averaged_copy(self.trained, config.ema_decay)
            self.stored[f"ema_{name}"] = self.evaluated_modules[name] = self.averaged
        #: the step this invocation starts from
        self.start = load_checkpoint(self.checkpoint, self.stored, optimizer) if resuming else 0
        if self.ema is not None:
            self.ema.optimization_step = self.start
        self.sampled = (  # the model an evaluation samples
            self.controlled if self.averaged is None else controlled_by(self.pipe, self.averaged)
        )
        #: the learning rate by update (:func:`cnet.train.optim.lr_factor`)
        self.schedule = make_schedule(optimizer, config, self.start)
        # the controlled U-Net as accelerate prepared it (DDP-wrapped in several processes),
        # and accelerate's optimizer wrapper (loss scaling, accumulation)
        self.model, self.optimizer = self.accelerator.prepare(self.controlled, optimizer)
        scaler_state = (
            checkpoint_metadata(self.checkpoint).get("grad_scaler") if self.start > 0 else None
        )
        if self.accelerator.scaler is not None and scaler_state:
            self.accelerator.scaler.load_state_dict(json.loads(scaler_state))
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        #: training time behind the checkpoint it resumed from
        self.earlier_wall_time = checkpoint_wall_time(self.checkpoint) if self.start > 0 else 0.0
        self.data: CachedData | dict | None = None
        self.eval_data: CachedData | dict | None = None
        self.samples: dict = {}
        self.watch: RunWatch | None = None  # best weights and collapse alerts (main process)
        self.started = 0.0  # perf_counter() when this invocation's training began
        self._log_file = None

    # -------------------------------------------------------------------------- what it is

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

    @property
    def finished(self) -> bool:
        """Whether this run already took all its steps and wrote what it measured."""
        return self.start == self.config.steps and (self.out / "run.json").exists()

    def wall_time(self) -> float:
        return self.earlier_wall_time + time.perf_counter() - self.started

    # -------------------------------------------------------------------------- what it writes

    def save(self, step: int, wait: bool = True) -> None:
        """The checkpoint of the weights after ``step`` updates (main process), atomically."""
        if self.main:
            scaler = self.accelerator.scaler
            save_checkpoint(
                self.checkpoint,
                self.stored,
                self.optimizer,
                step,
                dataclasses.asdict(self.config),
                self.wall_time(),
                extra={"grad_scaler": scaler.state_dict()} if scaler else None,
            )
        if wait:  # no process runs ahead of a checkpoint it might be killed before
            self.accelerator.wait_for_everyone()

    def log(self, entry: dict) -> None:
        if not self.main:
            return
        self._log_file.write(json.dumps(entry) + "\n")
        self._log_file.flush()
        if self.on_log is not None:
            self.on_log(entry)

    def close(self) -> None:
        """Close the log (:meth:`run` does at its end)."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def load_data(self) -> None:
        """The training and evaluation data, cached once; the log opened (cut back to the
        checkpoint's step when resuming), the watch and the kept samples restored."""
        config = self.config
        if config.data:  # a folder: the main process caches it to disk, the others read that
            if self.main:
                self.data, self.eval_data = folder_data(self.pipe, config, self.out / "cache")
            self.accelerator.wait_for_everyone()
            if not self.main:
                self.data, self.eval_data = folder_data(self.pipe, config, self.out / "cache")
        else:
            self.data = cache_data(self.pipe, config.task, config.train_size, "train", config.seed)
            self.eval_data = cache_data(
                self.pipe, config.task, config.eval_size, "eval", config.seed
            )
        if not self.main:
            return
        truncate_log(self.out / "log.jsonl", self.start)
        self._log_file = (self.out / "log.jsonl").open("a")
        self.watch = RunWatch(self.out, self.metric)
        self.watch.restore(self.start)
        samples_path = self.out / "samples.safetensors"
        if self.start > 0 and samples_path.exists():  # keep what the checkpoint's weights made
            self.samples = {
                k: v
                for k, v in load_file(samples_path).items()
                if int(k.split("_")[1]) <= self.start
            }

    # -------------------------------------------------------------------------- one step

    def step(self, step: int, log: bool | None = None) -> tuple[float, dict | None]:
        """Optimizer step ``step`` (``grad_accum`` micro-batches, each split across the
        processes). Returns the loss and the step's log entry, measured before the update (so
        step 0 shows the zero convolutions at exactly 0), or None where the step is not logged:
        by ``log`` where given, else the first steps and every ``log_every``-th."""
        config, accelerator = self.config, self.accelerator
        self.optimizer.zero_grad(set_to_none=False)
        scaling = self.pipe.vae.config.scaling_factor
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(config.grad_accum):
            batch = process_share(
                draw_batch(self.data, config, step, micro, self.noise_scheduler), accelerator
            )
            # accelerate: autocast (in the prepared model), loss / grad_accum, loss scaling,
            # and no gradient all-reduce until the last micro-batch
            with accelerator.accumulate(self.model):
                loss = diffusion_loss(self.model, batch, self.noise_scheduler, scaling)
                accelerator.backward(loss)
            loss_sum += loss.detach() / config.grad_accum
        loss_value = accelerator.reduce(loss_sum, "mean").item()  # every process agrees on it
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step}; stopped, the last good "
                f"checkpoint ({self.checkpoint}) is kept. Try a lower --lr."
            )
        if log is None:
            log = step < FIRST_STEPS_LOGGED or step % config.log_every == 0
        entry = None
        if log or config.max_grad_norm:
            # fp16: the norms logged and clipped are the true gradients' (once per update: a
            # second unscale is an error)
            accelerator.unscale_gradients()
        if log:
            norms = logged_norms if isinstance(self.trained, ControlNet) else trained_norms
            entry = {"step": step, "loss": loss_value, **norms(self.trained)}
        if config.max_grad_norm:
            trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
            total = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
            if entry is not None and total > config.max_grad_norm:
                entry["clipped_from"] = total
        if self.on_update is not None:
            self.on_update(step, self.trained)
        scaler = accelerator.scaler
        scale = scaler.get_scale() if scaler is not None else None
        self.optimizer.step()
        self.schedule.step()  # also after an fp16 update skipped for overflow (cnet.train.optim)
        if self.ema is not None:
            self.ema.step(self.trained.parameters())
        # fp16: the gradients overflowed, the update was skipped and the scale lowered (read
        # from the scale, since fused AdamW skips inside its kernel and accelerate does not see
        # it)
        if entry is not None and scaler is not None and scaler.get_scale() < scale:
            entry["update_skipped"] = True
        return loss_value, entry

    def evaluate(self, step: int) -> dict:
        """Fidelity on the evaluation set (a folder's: its validation, :func:`validate`),
        measured by the main process; its images are kept in ``samples.safetensors`` and drawn
        under their conditions in ``validation/step_<k>.png``."""
        metrics = {}
        if self.main:
            self.sampled.eval()
            measure = validate if self.config.data else evaluate
            metrics, images = measure(
                self.pipe,
                self.sampled,
                self.eval_data,
                self.config.eval_steps,
                self.config.guidance_scale,
            )
            self.controlled.train()
            conditions = (
                self.eval_data["condition"] if self.config.data else self.eval_data.condition
            )
            (self.out / "validation").mkdir(exist_ok=True)
            validation_grid(conditions, images).save(
                self.out / "validation" / f"step_{step:06d}.png"
            )
            self.samples[f"step_{step}"] = (
                ((images + 1) * 127.5).round().to(torch.uint8).contiguous()
            )
            path = self.out / "samples.safetensors"
            tmp = path.with_name(path.name + ".tmp")
            save_file(self.samples, tmp)
            tmp.replace(path)
            self.log({"step": step, "eval": metrics})
            self.watch.evaluated(step, metrics, self.evaluated_modules)
        self.accelerator.wait_for_everyone()
        return metrics

    def last_evaluation(self) -> dict:
        """The evaluation the run's current weights last had: a fresh one at step 0, else the
        log's last one, until the next evaluation."""
        if self.start == 0:
            return self.evaluate(0) if self.config.eval_every > 0 else {}
        if not self.main:  # the main process may be rewriting the log (truncate_log)
            return {}
        lines = (self.out / "log.jsonl").read_text().splitlines()
        evals = [json.loads(line)["eval"] for line in lines if '"eval"' in line]
        return evals[-1] if evals else {}

    # -------------------------------------------------------------------------- the run

    def run(self) -> dict:
        """Steps from :attr:`start` to the end, with logging, evaluation and checkpoints;
        Ctrl-C saves a checkpoint first. Returns the last evaluation."""
        config = self.config
        self.started = time.perf_counter()
        last_eval = self.last_evaluation()
        completed = self.start  # optimizer steps taken so far
        # redrawn at most once a second: in a notebook every redraw is a widget message, and a
        # flood of them can outrun the kernel's output channel (nbval then loses the cell's end)
        bar = tqdm(
            range(self.start, config.steps),
            initial=self.start,
            total=config.steps,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0,
            disable=not self.main,
        )
        try:
            for step in bar:
                loss, entry = self.step(step)
                completed = step + 1
                if entry is not None:
                    self.log(entry)
                    if self.watch is not None:
                        self.watch.losses.append(entry["loss"])
                if config.eval_every > 0 and (
                    completed % config.eval_every == 0 or completed == config.steps
                ):
                    last_eval = self.evaluate(completed)
                if completed % config.checkpoint_every == 0 or completed == config.steps:
                    self.save(completed)
                for kind, line in self.watch.check(completed) if self.main else ():
                    bar.write(line)
                    self.log({"step": completed, "alert": line, "kind": kind})
                postfix = {
                    "loss": f"{loss:.4f}",
                    self.metric: f"{last_eval.get(self.metric, float('nan')):.3f}",
                }
                if self.main and self.watch.alerts:
                    postfix["alert"] = "+".join(sorted(self.watch.alerts))
                bar.set_postfix(postfix, refresh=False)
        except KeyboardInterrupt:
            self.save(completed, wait=False)  # the other processes may not have been interrupted
            print(
                f"\ninterrupted: saved step {completed} to {self.checkpoint}; run again to resume"
            )
            raise
        finally:
            bar.close()
            self.close()
        return last_eval

    def summary(self, profile: str, last_eval: dict) -> dict:
        """What ``run.json`` records: profile, where it ran, the steps, the wall time, the last
        evaluation and the settings."""
        return {
            "profile": profile,
            "device": str(self.device),
            "processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
            "device_name": (
                torch.cuda.get_device_name(self.device)
                if self.device.type == "cuda"
                else f"cpu, {torch.get_num_threads()} thread(s)"
            ),
            "steps": self.config.steps,
            "resumed_from": self.start,
            # the training time behind these weights, over every invocation that produced them
            # (setup and work lost to a crash after the last checkpoint not counted)
            "wall_time_s": finite_or_none(round(self.wall_time(), 1)),
            "wall_time_this_invocation_s": round(time.perf_counter() - self.started, 1),
            "final_eval": last_eval,
            "config": dataclasses.asdict(self.config),
        }


def train(
    config: TrainConfig,
    profile: str = "custom",
    on_log: Callable[[dict], None] | None = None,
    on_update: Callable[[int, ControlNet], None] | None = None,
) -> dict:
    """Train a ControlNet on the locked base ``config.base`` and return a summary (final step,
    wall time, last evaluation). Writes ``log.jsonl``, ``checkpoint.safetensors``,
    ``samples.safetensors`` (the evaluation images at each evaluation), ``config.json`` and,
    at the end, ``run.json`` (profile, device, wall time, last evaluation) to ``config.out``.
    ``on_log`` and ``on_update`` as :class:`Trainer` takes them (under fp16 the gradients
    ``on_update`` sees are unscaled on logged steps only)."""
    trainer = Trainer(config, on_log, on_update)
    if trainer.finished:  # running a finished run again must not overwrite what it measured
        print(f"{trainer.out} already finished {config.steps} steps; nothing to do")
        return json.loads((trainer.out / "run.json").read_text())
    if trainer.main:
        (trainer.out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    trainer.load_data()
    last_eval = trainer.run()
    summary = trainer.summary(profile, last_eval)
    if trainer.main:
        (trainer.out / "run.json").write_text(json.dumps(summary, indent=2))
    return summary
