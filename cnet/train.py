r"""Training a ControlNet on a locked base (paper §3.3), nanoGPT-style: every setting is a plain
value of :class:`TrainConfig`, a profile fills them, and the command line overrides any one.

    python -m cnet train                               # quick profile on CPU, full on CUDA
    python -m cnet train --profile full --steps 8000 --lr 3e-4 --out runs/fill-full

What happens, and why:

* **Locked base.** VAE, text encoder and U-Net are frozen (no gradients, no optimizer state,
  eval mode). Only the ControlNet trains, with AdamW, as in the released ``cldm.py``
  (``configure_optimizers``). ``sd_locked=False`` also trains the U-Net's decoder (its up blocks
  and output layers) at ``decoder_lr_scale`` × the learning rate; the encoder never trains.
* **Loss.** The standard ε-prediction loss of the base (DDPM forward process at a uniformly drawn
  timestep), :math:`\lVert \epsilon - \epsilon_\theta(z_t, t, c_t, c_f) \rVert^2`.
* **Empty prompts.** ``empty_prompt_ratio`` (0.5 by default, the paper's choice) of the prompts
  are replaced by the empty string, so the ControlNet learns to read the condition itself.
* **Frozen work is done once.** The VAE's latent distribution (mean, std) of every training image
  and the text embedding of every distinct prompt are computed before the first step; each step
  draws a latent from the cached distribution, as encoding would.
* **Exact resume.** Every random draw of step ``k`` comes from a generator seeded with
  ``(seed, k)``; a checkpoint holds the weights, the optimizer state and ``k``, in one
  safetensors file replaced atomically. A resumed CPU run equals the uninterrupted one, bit for
  bit. A non-finite loss stops the run and leaves the last good checkpoint; Ctrl-C saves first.
* **Logged.** Every ``log_every`` steps: the loss, each zero convolution's weight norm and
  gradient norm (the 12 + 1 residual ones and the condition encoder's), the trainable copy's
  gradient norm. Every ``eval_every`` steps: condition fidelity on a fixed evaluation set,
  sampled with fixed seeds (:func:`evaluate`). One JSON object per line in ``log.jsonl``.

Learning rate: the released tutorial uses 1e-5 with batch 4 for SD1.5's 361M-parameter
ControlNet. The miniature ControlNet is ~1000× smaller and trains with larger batches, and
it tolerates a larger step: in the quick profile lr 1e-4 jumps at step 700, 2e-4 at 350 and
5e-4 at 300, ending at IoU 0.59, 0.73 and 0.75 after 800 steps (figures/05_compare_lr.json).
Both profiles use 2e-4; ``--lr`` overrides it. The quick profile (800 steps of batch 16,
about 3 minutes on 2 CPU cores) already takes Fill's IoU from the base's chance level to well
above it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .block import lock
from .controlnet import ControlledUNet, ControlNet

__all__ = [
    "TrainConfig",
    "TrainingLog",
    "read_log",
    "write_figures",
    "run_figures",
    "export_run",
    "load_controlnet",
    "compare_runs",
    "PROFILES",
    "TrainingDiverged",
    "load_base",
    "train",
    "evaluate",
    "zero_conv_norms",
]

TASKS = ("fill", "outline", "canny", "segmentation", "depth", "scribble")


@dataclass
class TrainConfig:
    """Every setting of a ControlNet training run. The defaults are the quick profile."""

    base: str = "models/miniature-sd"  # a StableDiffusionPipeline folder (diffusers format)
    task: str = "fill"  # "fill", or a Shapes condition: outline, canny, segmentation, ...
    out: str = "runs/controlnet-fill-quick"
    steps: int = 800
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 1e-2  # AdamW's default, as the released code leaves it
    empty_prompt_ratio: float = 0.5
    sd_locked: bool = True
    decoder_lr_scale: float = 0.1
    hint_encoder: str = "released"
    train_size: int = 4096
    eval_size: int = 32
    eval_every: int = 50
    eval_steps: int = 10  # DDIM steps when sampling the evaluation set
    guidance_scale: float = 3.0
    log_every: int = 1
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    resume: bool = True

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


PROFILES: dict[str, dict] = {
    "quick": {},
    "full": dict(
        out="runs/controlnet-fill-full", steps=4000, batch_size=32, train_size=20_000,
        eval_size=64, eval_every=100, eval_steps=20, log_every=5, checkpoint_every=250,
    ),
}

# The first steps are always logged, whatever ``log_every``: they hold Eq. 6 and Eq. 8 (the
# trainable copy's gradient is exactly zero at step 1 and non-zero from step 2).
FIRST_STEPS_LOGGED = 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


# ------------------------------------------------------------------------------------------
# The locked base and the data, computed once
# ------------------------------------------------------------------------------------------


def load_base(path: str | Path, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """Load a diffusers ``StableDiffusionPipeline`` folder offline and lock VAE, text encoder and
    U-Net (:func:`cnet.lock`)."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"expected a diffusers pipeline folder with model_index.json at {path}; build the "
            "miniature base with `python -m cnet.world pretrain`"
        )
    # the miniature models are small: load them plainly rather than through accelerate's
    # low-memory path (which diffusers would otherwise ask for, with a warning, where it is absent)
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                   low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        lock(part)
    return pipe


def _dataset(task: str, size: int, split: str, resolution: int, seed: int):
    from .world.data import FillDataset, ShapesDataset

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    cls = FillDataset if task == "fill" else ShapesDataset
    return cls(size=size, split=split, resolution=resolution, seed=seed)


def _condition_key(task: str) -> str:
    return "outline" if task == "fill" else task


@dataclass
class CachedData:
    """What the frozen networks make of a dataset, computed once: the VAE's latent mean and std
    per image, the condition images, and one text embedding per distinct prompt."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    conditions: torch.Tensor
    prompt_index: torch.Tensor  # (N,) index into `embeddings`; index 0 is the empty prompt
    embeddings: torch.Tensor  # (P, L, D)
    prompts: list[str]  # the distinct prompts, prompts[0] == ""
    extras: dict = field(default_factory=dict)  # evaluation ground truth (masks, colours)


@torch.no_grad()
def cache_data(pipe: StableDiffusionPipeline, task: str, size: int, split: str, seed: int,
               chunk: int = 256) -> CachedData:
    """Render ``size`` samples of ``task`` and push them through the frozen VAE and text
    encoder once."""
    device = pipe.unet.device
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = _dataset(task, size, split, resolution, seed)
    key = _condition_key(task)
    means, stds, conditions, prompts_all, layers, fg, bg = [], [], [], [], [], [], []
    for start in range(0, size, chunk):
        indices = list(range(start, min(size, start + chunk)))
        batch = dataset.batch(indices)
        scenes = dataset.scenes(indices)
        dist = pipe.vae.encode(batch["image"].to(device, pipe.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        conditions.append(batch[key].float())
        prompts_all += batch["prompt"]
        layers.append(batch["layers"])
        fg.append(torch.from_numpy(scenes.colour[:, 0].copy()))
        bg.append(torch.from_numpy(scenes.background.copy()))
    distinct = [""] + sorted(set(prompts_all) - {""})
    lookup = {p: i for i, p in enumerate(distinct)}
    embeddings = torch.cat([
        pipe.encode_prompt(distinct[i : i + chunk], device, 1, False)[0].float().cpu()
        for i in range(0, len(distinct), chunk)
    ])
    return CachedData(
        latent_mean=torch.cat(means), latent_std=torch.cat(stds),
        conditions=torch.cat(conditions), embeddings=embeddings, prompts=distinct,
        prompt_index=torch.tensor([lookup[p] for p in prompts_all]),
        extras={"region": torch.cat(layers) > 0, "foreground": torch.cat(fg),
                "background": torch.cat(bg), "prompt": prompts_all},
    )


# ------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------


def _step_generator(seed: int, step: int) -> torch.Generator:
    # Step k's draws depend on (seed, k) alone: the key to exact resume.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _draw_batch(data: CachedData, config: TrainConfig, step: int, micro: int,
                noise_scheduler: DDPMScheduler, device: torch.device) -> dict:
    g = _step_generator(config.seed, step * max(1, config.grad_accum) + micro)
    n = len(data.prompt_index)
    idx = torch.randint(0, n, (config.batch_size,), generator=g)
    latents = data.latent_mean[idx] + data.latent_std[idx] * torch.randn(
        data.latent_mean[idx].shape, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (config.batch_size,), generator=g)
    keep_prompt = torch.rand(config.batch_size, generator=g) >= config.empty_prompt_ratio
    prompt_index = torch.where(keep_prompt, data.prompt_index[idx], 0)
    return {
        "latents": latents.to(device), "noise": noise.to(device), "timesteps": timesteps.to(device),
        "embeddings": data.embeddings[prompt_index].to(device),
        "conditions": data.conditions[idx].to(device),
    }


def diffusion_loss(controlled: ControlledUNet, batch: dict, noise_scheduler: DDPMScheduler,
                   scaling_factor: float) -> torch.Tensor:
    r"""The ε-prediction loss with control: :math:`\lVert \epsilon - \epsilon_\theta(z_t, t, c_t,
    c_f)\rVert^2`, :math:`z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`
    (diffusers' ``DDPMScheduler.add_noise``)."""
    z0 = batch["latents"] * scaling_factor
    zt = noise_scheduler.add_noise(z0, batch["noise"], batch["timesteps"])
    eps = controlled(zt, batch["timesteps"], batch["embeddings"], batch["conditions"])
    return F.mse_loss(eps.float(), batch["noise"].float())


def zero_conv_norms(controlnet: ControlNet, grads: bool = False) -> dict[str, float]:
    """The weight norm (or gradient norm) of each zero convolution: the 12 + 1 residual ones,
    ``zero_conv.<i>`` and ``zero_conv.mid``, and the condition encoder's last layer,
    ``zero_conv.hint``."""
    convs = {f"zero_conv.{i}": z for i, z in enumerate(controlnet.zero_convs)}
    convs["zero_conv.mid"] = controlnet.mid_zero_conv
    hint = controlnet.hint_encoder  # the released encoder calls its zero conv conv_out
    convs["zero_conv.hint"] = hint.zero_conv if hasattr(hint, "zero_conv") else hint.conv_out
    out = {}
    for name, conv in convs.items():
        tensors = [conv.weight.grad, conv.bias.grad] if grads else [conv.weight, conv.bias]
        out[name] = math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors
                                  if t is not None))
    return out


def _grad_norm(parameters) -> float:
    return math.sqrt(sum(float(p.grad.detach().float().pow(2).sum())
                         for p in parameters if p.grad is not None))


def trainable_copy_parameters(controlnet: ControlNet) -> list[torch.nn.Parameter]:
    r""":math:`\Theta_c`: the copied conv_in, time embedding, down blocks and mid block."""
    parts = (controlnet.conv_in, controlnet.time_embedding, controlnet.down_blocks,
             controlnet.mid_block)
    return [p for part in parts for p in part.parameters()]


# ------------------------------------------------------------------------------------------
# Evaluation: condition fidelity with fixed sampler seeds
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(pipe: StableDiffusionPipeline, controlled: ControlledUNet | None, data: CachedData,
             steps: int = 20, guidance_scale: float = 3.0, seed: int = 1234,
             batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    """Sample the evaluation set (its prompts and conditions) with fixed seeds and measure
    fidelity: IoU of the drawn foreground with the region the condition encloses, and whether
    the prompted foreground and background colours were drawn. ``controlled=None`` measures the
    base alone. Returns the metrics and the images (N, 3, H, W) in [-1, 1]."""
    from .sample import sample
    from .world.data import COLOUR_NAMES
    from .world.metrics import classify_colours, colours_drawn, iou

    images = []
    for start in range(0, len(data.extras["prompt"]), batch_size):
        end = start + batch_size
        g = torch.Generator(pipe.unet.device).manual_seed(seed + start)
        images.append(sample(pipe, controlled, data.extras["prompt"][start:end],
                             data.conditions[start:end], num_inference_steps=steps,
                             guidance_scale=guidance_scale, generator=g).float().cpu())
    images = torch.cat(images)
    drawn = classify_colours(images)
    foreground = drawn == data.extras["foreground"][:, None, None]
    ious = iou(foreground, data.extras["region"])
    colours = colours_drawn(images, [[COLOUR_NAMES[i]] for i in data.extras["foreground"]],
                            [COLOUR_NAMES[i] for i in data.extras["background"]])
    metrics = {
        "iou": float(ious.mean()),
        "colours_ok": float(colours["both_ok"].float().mean()),
        "n": len(images),
    }
    return metrics, images


# ------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, replaced atomically
# ------------------------------------------------------------------------------------------


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optimizer.{pid}.{name}"] = (
                value if torch.is_tensor(value) else torch.tensor(value)
            ).detach().cpu().contiguous()
    return out


def save_checkpoint(path: Path, trainable: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, step: int, config: TrainConfig,
                    wall_time_s: float = 0.0) -> None:
    """Weights of every trainable module, the optimizer state, the step and the wall time spent
    so far, in one file written to a temporary name and moved into place, so a crash never
    leaves half a checkpoint."""
    tensors = {f"{prefix}.{k}": v.detach().cpu().contiguous()
               for prefix, module in trainable.items() for k, v in module.state_dict().items()}
    tensors.update(_optimizer_tensors(optimizer))
    metadata = {"step": str(step), "config": json.dumps(dataclasses.asdict(config)),
                "wall_time_s": f"{wall_time_s:.1f}"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    step = int(_checkpoint_metadata(path)["step"])
    tensors = load_file(path)
    for prefix, module in trainable.items():
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(sub, strict=True)
    if optimizer is not None:
        state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                state["state"].setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict(state)
    return step


def _checkpoint_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


def checkpoint_wall_time(path: Path) -> float:
    """Seconds of training behind the checkpoint at ``path``, over all resumes (nan where the
    checkpoint did not record it)."""
    return float(_checkpoint_metadata(path).get("wall_time_s", "nan"))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# Settings a run may change when it resumes (where it runs, how long it goes on, how often it
# saves): none of them changes what the steps already taken compute.
RESUMABLE_CHANGES = ("out", "resume", "device", "steps", "checkpoint_every")


def _check_resumable(path: Path, config: TrainConfig) -> None:
    """Refuse to resume a checkpoint trained with other settings, or past the requested end."""
    metadata = _checkpoint_metadata(path)
    step, saved = int(metadata["step"]), json.loads(metadata["config"])
    changed = [k for k, v in dataclasses.asdict(config).items()
               if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if changed:
        raise ValueError(
            f"{path} was trained with other settings ("
            + ", ".join(f"{k}: {saved[k]!r} there, {getattr(config, k)!r} now" for k in changed)
            + "); pass a new --out, or --resume false to start over"
        )
    if step > config.steps:
        raise ValueError(f"{path} is at step {step}, beyond the requested {config.steps} steps")


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def _truncate_log(path: Path, start: int) -> None:
    """Drop log entries a resumed run will write again (those after the checkpoint's step)."""
    if start == 0 or not path.exists():
        path.write_text("")
        return
    keep = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] < start or ("eval" in entry and entry["step"] <= start):
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _make_optimizer(controlnet: ControlNet, unet, config: TrainConfig, device: torch.device):
    groups = [{"params": [p for p in controlnet.parameters() if p.requires_grad],
               "lr": config.lr}]
    if not config.sd_locked:
        decoder = [unet.up_blocks, unet.conv_norm_out, unet.conv_out]
        params = [p for part in decoder if part is not None for p in part.parameters()]
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": config.lr * config.decoder_lr_scale})
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, **fast)


def train(config: TrainConfig, profile: str = "custom",
          on_log: Callable[[dict], None] | None = None) -> dict:
    """Train a ControlNet on the locked base ``config.base`` and return a summary (final step,
    wall time, last evaluation). Writes ``log.jsonl``, ``checkpoint.safetensors``,
    ``samples.safetensors`` (the evaluation images at each evaluation), ``config.json`` and,
    at the end, ``run.json`` (profile, device, wall time, last evaluation) to ``config.out``."""
    device = config.resolved_device()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.safetensors"
    resuming = config.resume and ckpt.exists()
    if resuming:
        _check_resumable(ckpt, config)
    torch.manual_seed(config.seed)
    pipe = load_base(config.base, device)
    controlnet = ControlNet.from_unet(
        pipe.unet, hint_encoder=config.hint_encoder,
        condition_size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
    ).to(device)
    controlled = ControlledUNet(pipe.unet, controlnet)
    controlled.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = _make_optimizer(controlnet, pipe.unet, config, device)
    trainable = {"controlnet": controlnet}
    if not config.sd_locked:
        trainable["unet"] = pipe.unet

    start = load_checkpoint(ckpt, trainable, optimizer) if resuming else 0
    if start == config.steps and (out / "run.json").exists():
        # a finished run: running it again must not overwrite what it measured
        print(f"{out} already finished {config.steps} steps; nothing to do")
        return json.loads((out / "run.json").read_text())
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    earlier_wall_time = checkpoint_wall_time(ckpt) if start > 0 else 0.0

    data = cache_data(pipe, config.task, config.train_size, "train", config.seed)
    eval_data = cache_data(pipe, config.task, config.eval_size, "eval", config.seed)
    log_path, samples_path = out / "log.jsonl", out / "samples.safetensors"
    _truncate_log(log_path, start)
    samples = {}
    if start > 0 and samples_path.exists():  # keep what the checkpoint's weights had produced
        samples = {k: v for k, v in load_file(samples_path).items()
                   if int(k.split("_")[1]) <= start}
    log_file = log_path.open("a")

    def log(entry: dict) -> None:
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        if on_log is not None:
            on_log(entry)

    def run_eval(step: int) -> dict:
        controlled.eval()
        metrics, images = evaluate(pipe, controlled, eval_data, config.eval_steps,
                                   config.guidance_scale)
        controlled.train()
        samples[f"step_{step}"] = ((images + 1) * 127.5).round().to(torch.uint8).contiguous()
        tmp = samples_path.with_name(samples_path.name + ".tmp")
        save_file(samples, tmp)
        os.replace(tmp, samples_path)
        log({"step": step, "eval": metrics})
        return metrics

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    scaling = pipe.vae.config.scaling_factor
    copy_params = trainable_copy_parameters(controlnet)
    started = time.perf_counter()
    if start == 0:
        last_eval = run_eval(0) if config.eval_every > 0 else {}
    else:  # the evaluation the checkpoint's weights last had, until the next one
        evals = [json.loads(line)["eval"] for line in log_path.read_text().splitlines()
                 if '"eval"' in line]
        last_eval = evals[-1] if evals else {}

    def wall_time() -> float:
        return earlier_wall_time + time.perf_counter() - started

    completed = start  # optimizer steps taken so far
    # redrawn at most once a second: in a notebook every redraw is a widget message, and a
    # flood of them can outrun the kernel's output channel (nbval then loses the cell's end)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train",
               dynamic_ncols=True, mininterval=1.0)
    try:
        for step in bar:
            optimizer.zero_grad(set_to_none=False)
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                batch = _draw_batch(data, config, step, micro, noise_scheduler, device)
                with autocast:
                    loss = diffusion_loss(controlled, batch, noise_scheduler, scaling)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {step}; stopped, the last good "
                        f"checkpoint ({ckpt}) is kept. Try a lower --lr."
                    )
                (loss / config.grad_accum).backward()
                loss_sum += loss.item() / config.grad_accum
            logged = step < FIRST_STEPS_LOGGED or step % config.log_every == 0
            if logged:  # norms before the update: step 0 shows the zero convs at exactly 0
                entry = {"step": step, "loss": loss_sum,
                         "weight_norm": zero_conv_norms(controlnet),
                         "grad_norm": zero_conv_norms(controlnet, grads=True),
                         "copy_grad_norm": _grad_norm(copy_params)}
            optimizer.step()
            completed = step + 1
            if logged:
                log(entry)
            if config.eval_every > 0 and (completed % config.eval_every == 0
                                          or completed == config.steps):
                last_eval = run_eval(completed)
            if completed % config.checkpoint_every == 0 or completed == config.steps:
                save_checkpoint(ckpt, trainable, optimizer, completed, config, wall_time())
            bar.set_postfix(loss=f"{loss_sum:.4f}",
                            iou=f"{last_eval.get('iou', float('nan')):.3f}", refresh=False)
    except KeyboardInterrupt:
        save_checkpoint(ckpt, trainable, optimizer, completed, config, wall_time())
        print(f"\ninterrupted: saved step {completed} to {ckpt}; run again to resume")
        raise
    finally:
        log_file.close()
        bar.close()

    summary = {
        "profile": profile, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"cpu, {torch.get_num_threads()} thread(s)"),
        "steps": config.steps, "resumed_from": start,
        # the training time behind these weights, over every invocation that produced them
        # (setup and work lost to a crash after the last checkpoint not counted)
        "wall_time_s": _finite_or_none(round(wall_time(), 1)),
        "wall_time_this_invocation_s": round(time.perf_counter() - started, 1),
        "final_eval": last_eval, "config": dataclasses.asdict(config),
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------------------
# Reading a run back
# ------------------------------------------------------------------------------------------


@dataclass
class TrainingLog:
    """A run's ``log.jsonl`` as columns: per logged step the loss, each zero conv's weight and
    gradient norm, the trainable copy's gradient norm; per evaluation the fidelity."""

    steps: list[int]
    loss: list[float]
    weight_norm: dict[str, list[float]]
    grad_norm: dict[str, list[float]]
    copy_grad_norm: list[float]
    eval_steps: list[int]
    eval_iou: list[float]
    eval_colours: list[float]


def read_log(path: str | Path) -> TrainingLog:
    """Parse a run's log (the file, or the run folder holding ``log.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_entries = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval" in e]
    names = list(train_entries[0]["weight_norm"]) if train_entries else []
    return TrainingLog(
        steps=[e["step"] for e in train_entries],
        loss=[e["loss"] for e in train_entries],
        weight_norm={n: [e["weight_norm"][n] for e in train_entries] for n in names},
        grad_norm={n: [e["grad_norm"][n] for e in train_entries] for n in names},
        copy_grad_norm=[e["copy_grad_norm"] for e in train_entries],
        eval_steps=[e["step"] for e in evals],
        eval_iou=[e["eval"]["iou"] for e in evals],
        eval_colours=[e["eval"]["colours_ok"] for e in evals],
    )


def run_figures(run: str | Path, label: str = "") -> dict:
    """A run's figures (the run folder, or a shipped one): fidelity and loss with the detected
    convergence step, the zero convolutions' growth, the first steps' gradients, and a grid of
    samples before, at and after the jump. Returns ``{name: Figure}`` and the detector's report
    under ``"report"`` (None with fewer than 5 evaluations)."""
    from .convergence import detect_sudden_convergence
    from .plots import (
        plot_fidelity_and_loss,
        plot_first_step_gradients,
        plot_sample_grid,
        plot_zero_conv_growth,
    )

    run = Path(run)
    log = read_log(run)
    report = (detect_sudden_convergence(log.eval_steps, log.eval_iou)
              if len(log.eval_steps) >= 5 else None)
    figures = {
        "fidelity_and_loss": plot_fidelity_and_loss(log, report, label),
        "zero_conv_growth": plot_zero_conv_growth(log, label),
        "first_steps_gradients": plot_first_step_gradients(log, label=label),
    }
    samples = load_file(run / "samples.safetensors")
    steps = sorted(int(k.split("_")[1]) for k in samples)
    if report is not None and report.converged:
        wanted = [steps[0], report.start, report.step, report.end, steps[-1]]
    else:
        wanted = [steps[round(q * (len(steps) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)]
    shown = sorted({min(steps, key=lambda s, w=w: abs(s - w)) for w in wanted})
    config = json.loads((run / "config.json").read_text())
    conditions = cache_conditions(config["task"], config["eval_size"], config["seed"],
                                  resolution=samples[f"step_{steps[0]}"].shape[-1])
    rows = min(6, len(conditions), len(samples[f"step_{steps[0]}"]))
    figures["samples_over_training"] = plot_sample_grid(
        {k: v[:rows] for k, v in samples.items()}, conditions[:rows], shown, label)
    figures["report"] = report
    return figures


def write_figures(run: str | Path, prefix: str = "05", label: str = "") -> list[Path]:
    """Save :func:`run_figures` to figures/ as ``<prefix>_<name>.png``; returns the paths."""
    from .plots import save_figure

    figures = run_figures(run, label)
    figures.pop("report")
    return [save_figure(fig, f"{prefix}_{name}") for name, fig in figures.items()]


def cache_conditions(task: str, size: int, seed: int, resolution: int) -> torch.Tensor:
    """The evaluation set's condition images (what :func:`cache_data` stores), without a model."""
    dataset = _dataset(task, size, "eval", resolution, seed)
    return dataset.batch(list(range(size)))[_condition_key(task)].float()


# ------------------------------------------------------------------------------------------
# Shipping a trained ControlNet, and loading it back
# ------------------------------------------------------------------------------------------

RUN_FILES = ("log.jsonl", "config.json", "run.json")


def export_run(run: str | Path, out: str | Path, samples_kept: int = 8) -> Path:
    """Ship a finished run: its ControlNet as a diffusers ``ControlNetModel`` folder
    (``out/controlnet``, safetensors, loadable with ``ControlNetModel.from_pretrained``) beside the
    run's log, config and summary, and the evaluation samples of its first ``samples_kept``
    conditions at every evaluation. ``out`` is then itself a run folder: :func:`read_log` and
    :func:`write_figures` read it as they read ``run``. The optimizer state is left behind."""
    run, out = Path(run), Path(out)
    config = TrainConfig(**json.loads((run / "config.json").read_text()))
    if config.hint_encoder != "released":
        raise ValueError("only the released hint encoder has a diffusers ControlNetModel form, "
                         f"this run used {config.hint_encoder!r}")
    pipe = load_base(config.base)
    controlnet = ControlNet.from_unet(
        pipe.unet, hint_encoder=config.hint_encoder,
        condition_size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
    )
    step = load_checkpoint(run / "checkpoint.safetensors", {"controlnet": controlnet}, None)
    if step != config.steps:
        raise ValueError(f"the run in {run} stopped at step {step} of {config.steps}; "
                         "finish it (run the same command again) before shipping it")
    if out.exists() and any(out.iterdir()) and not (out / "run.json").exists():
        raise ValueError(f"{out} exists and is not a shipped run; export into a new folder")
    # written beside `out` and moved into place whole: a crash leaves no half-shipped folder
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    controlnet.to_diffusers().save_pretrained(staging / "controlnet", safe_serialization=True)
    for name in RUN_FILES:
        (staging / name).write_bytes((run / name).read_bytes())
    samples = load_file(run / "samples.safetensors")
    save_file({k: v[:samples_kept].contiguous() for k, v in samples.items()},
              staging / "samples.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def load_controlnet(folder: str | Path) -> ControlNet:
    """A shipped ControlNet (see :func:`export_run`), or any diffusers ``ControlNetModel``
    folder, as a cnet :class:`~cnet.controlnet.ControlNet`."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    if (folder / "controlnet" / "config.json").exists():
        folder = folder / "controlnet"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no ControlNetModel in {folder}: expected a config.json there "
                                "or in its controlnet/ subfolder")
    model = ControlNetModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return ControlNet.from_diffusers(model).eval()


# ------------------------------------------------------------------------------------------
# Which knob makes convergence sudden: runs that differ in one setting, side by side
# ------------------------------------------------------------------------------------------


def compare_runs(runs: dict[str, str | Path]) -> dict:
    """Fidelity curves and convergence reports of several runs (label → run folder), for
    :func:`cnet.plots.plot_knob_comparison`. Every run must have at least 5 evaluations."""
    from .convergence import detect_sudden_convergence

    result = {}
    for label, run in runs.items():
        log = read_log(run)
        report = detect_sudden_convergence(log.eval_steps, log.eval_iou)
        result[label] = {"run": str(run), "eval_steps": log.eval_steps,
                         "eval_iou": log.eval_iou, "eval_colours": log.eval_colours,
                         "report": report.as_dict(),
                         "config": json.loads((Path(run) / "config.json").read_text())}
    return result
