r"""Pretraining the miniature Stable Diffusion, the locked base every ControlNet of cnet sits on.

    python -m cnet.world pretrain --profile quick --out runs/quick-sd
    python -m cnet.world pretrain --profile full --out models/miniature-sd \
        --run_dir runs/pretrain_full

Three stages, as Stable Diffusion was made (an autoencoder first, then diffusion in its latents,
then a sharper decoder for the same latents):

1. **VAE**: ``AutoencoderKL`` on images of both data families, loss
   :math:`\lVert D(z) - x \rVert^2 + \beta\,\mathrm{KL}(q(z|x) \,\|\, \mathcal N(0, I))`,
   :math:`z \sim q(z|x)`, with SD's tiny :math:`\beta`. Afterwards the latent scale is measured
   and stored as ``scaling_factor`` (SD1.5's 0.18215 was found the same way: 1 / std of latents).
2. **Text encoder + U-Net**, trained together from scratch on text only (no spatial condition),
   with SD's :math:`\epsilon`-prediction loss
   :math:`\lVert \epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t} z_0 + \sqrt{1-\bar\alpha_t}\,
   \epsilon, t, \tau(y)) \rVert^2` (DDPM noise schedule of SD1.5), with 10% of prompts replaced
   by the empty prompt so that classifier-free guidance works, as SD was trained. An
   exponential moving average (EMA) of the weights is what ships.
3. **Decoder fine-tune**: the decoder alone trains on, with the same reconstruction loss, while
   the encoder stays frozen, as Stable Diffusion's VAE decoder was later fine-tuned (the
   ``ft-MSE`` VAE). The latents do not change, so the U-Net trained on them stays valid: what
   improves is how sharply latents become pixels, the ceiling of every fidelity measure.

Settings are plain values (``Settings``), a profile fills them, and any one can be overridden on
the command line (``--unet_steps=200``), through the same helpers as ControlNet training
(:mod:`cnet.settings`). Every random draw of step ``k`` comes from a generator seeded by
``(seed, stage, k)``, so a run resumed from a checkpoint continues exactly as if it had never
stopped; checkpoints (weights, EMA, optimizer state) are written in the one checkpoint format of
:mod:`cnet.checkpoints` (safetensors, replaced atomically).

Each stage runs on accelerate, the engine ControlNets train on (backward, gradient clipping,
the prepared optimizer), in one CPU process, with torch's ``LambdaLR`` for the rate and
diffusers' ``EMAModel`` for the average. The shipped bases (``models/miniature-sd*``) were
trained by this loop before the average was diffusers': its first update then mixed 10% of the
initial weights in where ``EMAModel`` copies the weights, and it rounded each update
differently. The same command now trains the same weights bit for bit, and its average, what
ships, differs by float32 rounding (a 30-step run of every stage: logs, weights and optimizer
states equal, EMA weights within 1.2e-7; over a full run the rounding adds up further).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..averaging import averaged_copy
from ..checkpoints import check_resumable, checkpoint_wall_time, load_checkpoint, save_checkpoint
from ..processes import fresh_accelerator
from ..settings import (
    SettingError,
    check_settings,
    decay_rate,
    fraction,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
    positive_number,
)
from .data import FillDataset, ShapesDataset, check_resolution
from .model import (
    build_pipeline,
    build_schedulers,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    encode_prompts,
)
from .palette import STYLES

__all__ = [
    "Settings",
    "PROFILES",
    "cpu_description",
    "pretrain",
    "refuse_unused",
    "worst_pixel_error",
]

STAGE_IDS = {"vae": 1, "unet": 2, "decoder": 3, "style": 4, "refine": 5}
# What each stage's steps depend on; a resumed stage may change any other setting (where it runs,
# how often it saves, the later stage's settings) but none of these.
# The VAE's settings decide the latents every later stage trains on, so they are the later stages'
# too (the style fine-tune starts from a shipped base, whose VAE it does not retrain).
_VAE_SETTINGS = (
    "size",
    "resolution",
    "seed",
    "vae_steps",
    "vae_batch",
    "vae_lr",
    "kl_weight",
    "warmup_steps",
    "dataset_size",
)
_DECODER_SETTINGS = ("decoder_steps", "decoder_batch", "decoder_lr", "decoder_worst_weight")
_UNET_SETTINGS = ("unet_steps", "unet_batch", "unet_lr", "empty_prompt_ratio", "ema_decay")
STAGE_SETTINGS = {
    "vae": _VAE_SETTINGS,
    "unet": (*_VAE_SETTINGS, *_UNET_SETTINGS),
    "decoder": (*_VAE_SETTINGS, *_DECODER_SETTINGS),
    "style": ("resolution", "seed", "warmup_steps", "dataset_size", *_UNET_SETTINGS, "style"),
    # a shipped base's decoder refined (cnet.world.decoder), its VAE's encoder kept
    "refine": ("resolution", "seed", "warmup_steps", "dataset_size", *_DECODER_SETTINGS),
}


@dataclasses.dataclass
class Settings:
    """Every setting of a pretraining run (the defaults are the quick profile)."""

    size: str = "tiny"  # model widths, see model.SIZES
    resolution: int = 64
    seed: int = 0
    vae_steps: int = 40
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # SD's autoencoder uses a KL weight of 1e-6
    unet_steps: int = 40
    unet_batch: int = 16
    unet_lr: float = 1e-3
    warmup_steps: int = 10
    empty_prompt_ratio: float = 0.1  # SD drops 10% of captions for classifier-free guidance
    ema_decay: float = 0.99
    decoder_steps: int = 10  # 0 skips the decoder fine-tune
    decoder_batch: int = 16
    decoder_lr: float = 5e-4
    # weight of worst_pixel_error in the decoder's loss (0: squared error alone, as the shipped
    # base's stage 3 was trained)
    decoder_worst_weight: float = 0.0
    checkpoint_every: int = 20
    dataset_size: int = 50_000  # per family
    threads: int = 1
    style: str = "plain"  # the palette of the training images (cnet.world.data.STYLES)

    def check(self) -> Settings:
        """Refuse any value that cannot work (:class:`cnet.settings.SettingError`)."""
        from .model import SIZES, VAE_DOWNSAMPLING

        check_settings(
            self,
            {
                "size": one_of(*SIZES),
                "seed": non_negative_int(),
                "vae_steps": positive_int(),
                "vae_batch": positive_int(),
                "vae_lr": positive_number(),
                "kl_weight": non_negative_number(),
                "unet_steps": positive_int(),
                "unet_batch": positive_int(),
                "unet_lr": positive_number(),
                "decoder_steps": non_negative_int(),
                "decoder_batch": positive_int(),
                "decoder_lr": positive_number(),
                "decoder_worst_weight": non_negative_number(),
                "warmup_steps": non_negative_int(),
                "empty_prompt_ratio": fraction(),
                "ema_decay": decay_rate(),
                "checkpoint_every": positive_int(),
                "dataset_size": positive_int(),
                "threads": positive_int(),
                "style": one_of(*STYLES),
            },
        )
        try:
            check_resolution(self.resolution, VAE_DOWNSAMPLING)
        except ValueError:
            raise SettingError(
                f"resolution: {self.resolution!r} is not allowed; expected an "
                f"integer >= 16 divisible by {VAE_DOWNSAMPLING}"
            ) from None
        return self


def refuse_unused(s: Settings, used: tuple[str, ...], job: str) -> None:
    """Refuse, in one line, any setting outside ``used`` set away from its default: ``job``
    (a fine-tune, a decoder refinement) would not read it."""
    for name, value in dataclasses.asdict(s).items():
        if name not in used and value != getattr(Settings(), name):
            raise SettingError(
                f"{name}: {value!r} is not allowed for {job}; expected only {', '.join(used)}"
            )


PROFILES: dict[str, dict] = {
    "quick": {},
    "full": dict(
        size="small",
        vae_steps=1500,
        vae_batch=32,
        unet_steps=4000,
        unet_batch=48,
        warmup_steps=200,
        ema_decay=0.999,
        checkpoint_every=250,
        decoder_steps=2000,
        decoder_batch=32,
    ),
}


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The single source of randomness of one step: a function of (seed, stage, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_IDS[stage] * 100_000_007 + step)


def _batch(datasets, size: int, gen: torch.Generator) -> dict:
    """Half Fill, half Shapes, indices drawn from ``gen``."""
    half = size // 2
    parts = []
    for dataset, count in zip(datasets, (half, size - half), strict=True):
        indices = torch.randint(0, len(dataset), (count,), generator=gen).tolist()
        parts.append(dataset.batch(indices))
    return {
        "image": torch.cat([p["image"] for p in parts]),
        "prompt": parts[0]["prompt"] + parts[1]["prompt"],
    }


def _lr(peak: float, warmup_steps: int, total: int, step: int) -> float:
    """The learning rate of ``step``: a linear warm-up to ``peak``, then a cosine decay to 10% of
    it."""
    warmup = min(warmup_steps, total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------------------ checkpoints


def _prepare(
    modules: dict, params: list, peak: float, s: Settings, stage: str, steps: int, run_dir
):
    """One stage on accelerate (the engine ControlNets train on; the world's base trains in one
    CPU process): its AdamW over ``params`` and the rate's schedule, resumed from the stage's
    checkpoint where there is one. Returns (accelerator, optimizer, schedule, first step,
    training seconds so far)."""
    # the schedule steps once per update (not once per process, accelerate's default)
    accelerator = fresh_accelerator(
        cpu=True, mixed_precision="no", step_scheduler_with_optimizer=False
    )
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=peak))
    checkpoint = run_dir / f"{stage}.safetensors"
    start, elapsed = 0, 0.0
    if checkpoint.exists():
        settings = dataclasses.asdict(s)
        may_change = [k for k in settings if k not in STAGE_SETTINGS[stage]]
        check_resumable(checkpoint, settings, steps, may_change)
        start = load_checkpoint(checkpoint, modules, optimizer)
        elapsed = checkpoint_wall_time(checkpoint)
    # torch's LambdaLR sets each step's rate to initial_lr × its function: with 1 there, the
    # function gives the rate itself, rounded as the shipped bases were trained (peak × (k+1) /
    # warmup and peak × ((k+1) / warmup) differ in the last bit)
    for group in optimizer.param_groups:
        group["initial_lr"] = 1.0
    rate = functools.partial(_lr, peak, s.warmup_steps, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate, last_epoch=start - 1)
    return accelerator, optimizer, accelerator.prepare(schedule), start, elapsed


# ------------------------------------------------------------------------------ stages


def cpu_description(threads: int) -> str:
    """The machine a world record was made on, as the record names it."""
    return (
        f"cpu ({platform.processor() or platform.machine()}), "
        f"{threads} thread(s), torch {torch.__version__}"
    )


def worst_pixel_error(decoded: torch.Tensor, images: torch.Tensor, fraction: float = 0.01):
    r"""The mean, over the batch, of each image's worst ``fraction`` of pixels' squared RGB error
    :math:`\lVert \hat x_p - x_p \rVert^2`. A speck of a few pixels costs the mean squared
    error almost nothing; here it is most of what is counted."""
    errors = ((decoded - images) ** 2).sum(dim=1).flatten(1)
    worst = max(1, int(errors.shape[1] * fraction))
    return errors.topk(worst, dim=1).values.mean()


def _train_autoencoder(vae, datasets, s: Settings, run_dir: Path, log, stage: str) -> float:
    """Stage 1 (``"vae"``): the whole VAE, reconstruction + KL. Stage 3 (``"decoder"``), and a
    shipped base's decoder refined (``"refine"``): the decoder and the convolution before it, the
    encoder frozen, reconstruction only, plus ``decoder_worst_weight`` × :func:`worst_pixel_error`
    where that is set."""
    decoder_only = stage in ("decoder", "refine")
    steps, batch, peak = (
        (s.decoder_steps, s.decoder_batch, s.decoder_lr)
        if decoder_only
        else (s.vae_steps, s.vae_batch, s.vae_lr)
    )
    params = (
        [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
        if decoder_only
        else list(vae.parameters())
    )
    accelerator, optimizer, schedule, start, elapsed = _prepare(
        {"vae": vae}, params, peak, s, stage, steps, run_dir
    )
    began = time.time()
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.train()
    for step in tqdm(range(start, steps), desc=stage, initial=start, total=steps):
        gen = _generator(s.seed, stage, step)
        images = _batch(datasets, batch, gen)["image"]
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(images).latent_dist
            latents = posterior.sample(generator=gen)
        decoded = vae.decode(latents).sample
        mse = F.mse_loss(decoded, images)
        entry = {"stage": stage, "step": step, "mse": mse.item()}
        if not decoder_only:
            loss = mse + s.kl_weight * posterior.kl().mean()
        elif s.decoder_worst_weight > 0:
            worst = worst_pixel_error(decoded, images)
            loss = mse + s.decoder_worst_weight * worst
            entry["worst"] = worst.item()
        else:
            loss = mse
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        log(entry)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(
                run_dir / f"{stage}.safetensors",
                {"vae": vae},
                optimizer,
                step + 1,
                dataclasses.asdict(s),
                elapsed + time.time() - began,
            )
    vae.requires_grad_(False)
    vae.eval()
    return elapsed + time.time() - began if start < steps else elapsed


@torch.no_grad()
def _measure_latent_scale(vae, datasets, s: Settings) -> float:
    """1 / std of latents of 256 training images: the factor that gives the diffusion model
    latents of unit variance (how SD1.5's 0.18215 was chosen)."""
    images = _batch(datasets, 256, _generator(s.seed, "vae", 10**6))["image"]
    return float(1.0 / vae.encode(images).latent_dist.mode().std())


def _train_unet(pipe, datasets, s: Settings, run_dir: Path, log, stage: str = "unet") -> float:
    """Stage 2 (``"unet"``): U-Net and text encoder from scratch. ``"style"``: the U-Net alone,
    from the pipeline's weights (a fine-tune; the text encoder stays as it is). Both keep an EMA
    of what they train, and the EMA is what ships."""
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    trained = {"unet": unet} if stage == "style" else {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in reversed(trained.values()) for p in m.parameters()]
    for m in (unet, text_encoder):
        m.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ddpm, _ = build_schedulers()
    # the EMA's weights as locked modules (cnet.averaging): what a checkpoint stores and a
    # resume restores; the average continues from the step the resume reached
    pairs = {name: averaged_copy(m, s.ema_decay) for name, m in trained.items()}
    averaged = {name: m for name, (m, _) in pairs.items()}
    emas = {name: ema for name, (_, ema) in pairs.items()}
    modules = {**trained, **{f"ema_{name}": m for name, m in averaged.items()}}
    accelerator, optimizer, schedule, start, elapsed = _prepare(
        modules, params, s.unet_lr, s, stage, s.unet_steps, run_dir
    )
    for ema in emas.values():
        ema.optimization_step = start
    began = time.time()
    for m in trained.values():
        m.train()
    scale = vae.config.scaling_factor
    for step in tqdm(
        range(start, s.unet_steps), desc=" + ".join(trained), initial=start, total=s.unet_steps
    ):
        gen = _generator(s.seed, stage, step)
        batch = _batch(datasets, s.unet_batch, gen)
        with torch.no_grad():
            latents = vae.encode(batch["image"]).latent_dist.sample(generator=gen) * scale
        drop = torch.rand(len(batch["prompt"]), generator=gen) < s.empty_prompt_ratio
        prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist(), strict=True)]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(
            0, ddpm.config.num_train_timesteps, (len(latents),), generator=gen
        )
        noisy = ddpm.add_noise(latents, noise, timesteps)
        embeddings = encode_prompts(prompts, pipe.tokenizer, text_encoder)
        loss = F.mse_loss(unet(noisy, timesteps, embeddings).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        for name, m in trained.items():
            emas[name].step(m.parameters())
        log({"stage": stage, "step": step, "loss": loss.item()})
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.unet_steps:
            save_checkpoint(
                run_dir / f"{stage}.safetensors",
                modules,
                optimizer,
                step + 1,
                dataclasses.asdict(s),
                elapsed + time.time() - began,
            )
    # The EMA weights are the ones that ship.
    for name, m in trained.items():
        emas[name].copy_to(m.parameters())
        m.requires_grad_(False)
        m.eval()
    return elapsed + time.time() - began if start < s.unet_steps else elapsed


# ------------------------------------------------------------------------------ entry point


def pretrain(
    settings: Settings,
    out: Path,
    run_dir: Path,
    profile: str = "custom",
    command: list[str] | None = None,
):
    """Run the three stages (resuming from ``run_dir`` where checkpoints exist), save the
    pipeline to ``out`` with ``save_pretrained`` (safetensors), copy the per-step log to
    ``out/pretraining_log.jsonl`` and write ``out/pretraining.json`` (command, profile,
    settings, device, wall time, steps, final losses). Returns the pipeline."""
    s = settings.check()
    if s.style != "plain":
        raise SettingError(
            f"style: {s.style!r} is not allowed for pretraining; expected 'plain' "
            "(another style is a fine-tune: python -m cnet.world finetune)"
        )
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)  # model initialisation
    np.random.seed(s.seed)
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    datasets = [
        FillDataset(s.dataset_size, "train", s.resolution, s.seed),
        ShapesDataset(s.dataset_size, "train", s.resolution, s.seed),
    ]
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, s.size)
    vae = build_vae(s.size, s.resolution)
    unet = build_unet(text_encoder.config.hidden_size, s.size, s.resolution)
    with (run_dir / "log.jsonl").open("a") as log_file:

        def log(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        vae_seconds = _train_autoencoder(vae, datasets, s, run_dir, log, "vae")
        vae.register_to_config(scaling_factor=_measure_latent_scale(vae, datasets, s))
        pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
        unet_seconds = _train_unet(pipe, datasets, s, run_dir, log)
        decoder_seconds = _train_autoencoder(vae, datasets, s, run_dir, log, "decoder")
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # The per-step losses travel with the model, so a reader without the run folder (or a
    # GPU) still sees the real curves.
    shipped_log = "".join(json.dumps(e) + "\n" for e in _latest_entries(run_dir / "log.jsonl"))
    (out / "pretraining_log.jsonl").write_text(shipped_log)
    record = {
        "command": " ".join(command or sys.argv),
        "profile": profile,
        "settings": dataclasses.asdict(s),
        "device": cpu_description(s.threads),
        "wall_time_s": {
            "vae": round(vae_seconds, 1),
            "unet": round(unet_seconds, 1),
            "decoder": round(decoder_seconds, 1),
            "this_invocation": round(time.time() - started, 1),
        },
        "steps": {"vae": s.vae_steps, "unet": s.unet_steps, "decoder": s.decoder_steps},
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))
        },
        "vae_scaling_factor": vae.config.scaling_factor,
        "final": _final_losses(run_dir / "log.jsonl"),
    }
    (out / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    return pipe


def _latest_entries(path: Path) -> list[dict]:
    """The run's log, one entry per (stage, step) in training order: a step redone after a
    resume replaces the entry the interrupted run wrote for it."""
    latest = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        latest[(entry["stage"], entry["step"])] = entry
    return [latest[key] for key in sorted(latest, key=lambda k: (STAGE_IDS[k[0]], k[1]))]


def _final_losses(path: Path, window: int = 100) -> dict:
    """Mean of the last ``window`` logged values of each stage (the whole run, resumes included)."""
    entries = _latest_entries(path)

    def last(stage: str, key: str) -> float | None:
        values = [e[key] for e in entries if e["stage"] == stage][-window:]
        return float(np.mean(values)) if values else None

    return {
        f"vae_mse_last_{window}": last("vae", "mse"),
        f"unet_loss_last_{window}": last("unet", "loss"),
        f"decoder_mse_last_{window}": last("decoder", "mse"),
    }
