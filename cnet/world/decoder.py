"""The decoder's dark speck, and a refinement of the decoder alone that keeps the latents.

    python -m cnet.world refine-decoder --profile full --seeds 0 1 2 \\
        --root runs/decoder-refine-study --results figures/04_decoder_speck.json --threads 2

Decoded images of the miniature base carry a dark speck on a circle's edge: a few pixels that
are neither of the image's two colours nor a blend of them
(:func:`cnet.world.metrics.worst_specks`). The VAE's reconstructions of the world's own images
carry it nearly as often as the base's samples, so it is made in decoding, not by the U-Net. The
decoder was trained on the mean squared error, to which a speck of a few pixels adds almost
nothing.

The refinement is pretraining's stage 3 once more, from the shipped weights: the decoder and
the convolution before it train on, the encoder frozen, with each image's worst 1 % of pixels
(:func:`cnet.world.pretrain.worst_pixel_error`) added to the loss. The encoder is untouched, so
every latent, and the U-Net and ControlNets trained on them, stay valid. The study measures the
shipped and the refined decoders on the same latents: reconstructions of the evaluation split's
Fill images, and the base's own samples for their prompts.

Where the speck sits (:func:`speck_frame`) says whose it is: handed the same images mirrored or
turned, the VAE puts it at the same places of its own frame, not of the picture. Whether a clean
edge is within the shipped decoder's reach, :func:`fitted_latents_study` asks: latents fitted to
each image through the decoder, its weights untouched, lose most of the specks that the
encoder's latents decode to.

    python -m cnet.world fit-latents --samples 200 --steps 0 25 50 100 200 \\
        --results figures/04_fitted_latents.json --threads 2
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline

from ..checkpoints import check_resumable
from ..settings import SettingError
from .data import FillDataset, ShapesDataset, colour_index
from .evaluation import drawn_circle, generate
from .metrics import (
    FULL_SAMPLER,
    RIM_POSITIONS,
    SPECK_DISTANCE,
    fidelity,
    speck_positions,
    worst_specks,
)
from .model import load_pipeline
from .pretrain import (
    STAGE_SETTINGS,
    Settings,
    _latest_entries,
    _train_autoencoder,
    cpu_description,
    refuse_unused,
)

__all__ = [
    "FIT_LR",
    "FRAMES",
    "REFINE_PROFILES",
    "decoder_study",
    "fitted_latents_study",
    "fitted_latents_table",
    "refine_decoder",
    "speck_frame",
    "speck_report",
    "speck_table",
]

#: The refinement: seconds ("quick", tests) or 8 to 10 minutes on a 2-core CPU ("full"). The
#: full profile's weight and length were picked from single exploratory runs, not tuned over
#: seeds; figures/04_decoder_speck.json measures this setting on three.
REFINE_PROFILES: dict[str, dict] = {
    "quick": dict(
        decoder_steps=4,
        decoder_batch=4,
        warmup_steps=2,
        checkpoint_every=2,
        decoder_worst_weight=0.1,
    ),
    "full": dict(
        decoder_steps=1500,
        decoder_batch=32,
        decoder_lr=2e-4,
        warmup_steps=50,
        decoder_worst_weight=0.1,
        checkpoint_every=250,
    ),
}

_USED = (*STAGE_SETTINGS["refine"], "checkpoint_every", "threads")


def _check(settings: Settings) -> Settings:
    """The settings a refinement uses, checked; any other one set away from its default, or no
    steps at all, is refused in one line."""
    s = settings.check()
    refuse_unused(s, _USED, "a decoder refinement, which trains the base's decoder as it is")
    if s.decoder_steps < 1:
        raise SettingError(
            f"decoder_steps: {s.decoder_steps!r} is not allowed for a decoder refinement; "
            "expected an integer >= 1"
        )
    return s


def _check_run(base: str | Path, s: Settings, run_dir: Path) -> None:
    """Refuse, before any work, a base of another resolution, or a run folder made from another
    base or with other settings (resuming it would mix the two)."""
    made = json.loads((Path(base) / "vae" / "config.json").read_text())["sample_size"]
    if made != s.resolution:
        raise SettingError(
            f"resolution: {s.resolution!r} is not allowed; the base at {base} "
            f"makes {made} px images"
        )
    origin = run_dir / "base.txt"
    if origin.exists() and origin.read_text() != str(Path(base).resolve()):
        raise SettingError(f"{run_dir} refines {origin.read_text()}, not {base}; pass a new --root")
    checkpoint = run_dir / "refine.safetensors"
    if checkpoint.exists():
        may_change = [k for k in dataclasses.asdict(s) if k not in STAGE_SETTINGS["refine"]]
        check_resumable(
            checkpoint,
            dataclasses.asdict(s),
            s.decoder_steps,
            may_change,
            remedy="pass a new --root",
        )


def refine_decoder(
    base: str | Path, settings: Settings, run_dir: Path
) -> tuple[AutoencoderKL, float]:
    """The VAE of ``base`` with its decoder trained on (stage ``"refine"`` of
    :func:`cnet.world.pretrain._train_autoencoder`), saved to ``run_dir / "vae"``, and its
    training seconds; checkpoints and log in ``run_dir``, from which an interrupted run resumes
    exactly."""
    s = _check(settings)
    _check_run(base, s, run_dir)
    torch.set_num_threads(s.threads)
    vae = AutoencoderKL.from_pretrained(Path(base) / "vae")
    datasets = [
        FillDataset(s.dataset_size, "train", s.resolution, s.seed),
        ShapesDataset(s.dataset_size, "train", s.resolution, s.seed),
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "base.txt").write_text(str(Path(base).resolve()))
    with (run_dir / "log.jsonl").open("a") as log_file:

        def log(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        seconds = _train_autoencoder(vae, datasets, s, run_dir, log, "refine")
    vae.save_pretrained(run_dir / "vae", safe_serialization=True)
    return vae, seconds


@torch.no_grad()
def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1) for z in latents.split(50)]
    )


def _rates(images, foreground, background, region) -> dict:
    worst = worst_specks(images, foreground, background, region)
    return {
        "speck_rate_at_edge": (worst["edge"] >= SPECK_DISTANCE).float().mean().item(),
        "speck_rate_away_from_edge": (worst["away"] >= SPECK_DISTANCE).float().mean().item(),
        "median_worst_at_edge": worst["edge"].median().item(),
    }


def _fill_requests(samples: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``samples`` Fill images of the evaluation split, their colours and circles."""
    batch = FillDataset(max(samples, 1000), split="eval").batch(range(samples))
    words = [p.split() for p in batch["prompt"]]
    foreground = torch.tensor([colour_index(w[0]) for w in words])
    background = torch.tensor([colour_index(w[3]) for w in words])
    return batch, foreground, background, torch.as_tensor(batch["layers"]) > 0


#: Ways to hand the VAE the same images. Each but the first moves rim positions of the picture
#: (mirroring left-right takes 10:30 to 1:30; transposing keeps the 10:30-4:30 diagonal and
#: swaps 3:00 with 6:00); none moves the VAE's own pixel grid.
FRAMES = {
    "as drawn": lambda t: t,
    "mirrored left-right": lambda t: t.flip(-1),
    "flipped top to bottom": lambda t: t.flip(-2),
    "turned half round": lambda t: t.flip(-2, -1),
    "transposed": lambda t: t.transpose(-2, -1),
}


def speck_frame(pipe: StableDiffusionPipeline, samples: int = 200) -> dict[str, dict[str, int]]:
    """Whose frame is the speck in? The VAE's reconstructions of the first ``samples`` Fill
    evaluation images, handed to it in each of :data:`FRAMES`: for each, how many specks at
    the edge sit at each of :data:`~cnet.world.metrics.RIM_POSITIONS`, seen in the image the
    VAE was given. A speck that belonged to the picture would move with the rim it sits on; one
    made by the VAE stays where the VAE makes it."""
    batch, foreground, background, requested = _fill_requests(samples)
    counts = {}
    for name, transform in FRAMES.items():
        images = transform(batch["image"]).to(pipe.vae.device)
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
        where = speck_positions(
            _decode(pipe.vae, latents).cpu(), foreground, background, transform(requested)
        )
        counts[name] = {p: where.count(p) for p in RIM_POSITIONS}
    return counts


#: Adam's learning rate when latents are fitted to images (:func:`fitted_latents_study`): picked
#: from one exploratory run, not tuned; at 200 steps the share with a speck is still falling.
FIT_LR = 1e-2


def _rms(tensor: torch.Tensor) -> float:
    return tensor.float().pow(2).mean().sqrt().item()


def fitted_latents_study(
    pipe: StableDiffusionPipeline,
    samples: int = 200,
    steps: tuple[int, ...] = (0, 25, 50, 100, 200),
    lr: float = FIT_LR,
) -> dict[str, dict]:
    """Can the decoder draw the circle's edge without a speck? The first ``samples`` Fill
    evaluation images, each given the latent the encoder makes of it (its mode), then that latent
    fitted to the image by gradient descent through the decoder: Adam (``lr``) on the squared
    error, the VAE's weights untouched. After each count in ``steps`` (0: the encoder's latent),
    keyed by the count as text: the share of images with a speck at the edge and where on the rim
    they sit, the mean squared error, the fidelity IoU, and how far the latents moved (root mean
    square, beside the encoder's latents' own). A speck that fitting removes is an edge the
    decoder can draw clean, from a latent near the one it was handed."""
    if not steps or any(n < 0 for n in steps):
        raise SettingError(f"steps: {steps!r} is not allowed; expected integers >= 0")
    batch, foreground, background, requested = _fill_requests(samples)
    vae = pipe.vae
    # Fitted where the VAE is, the latents in float32, and measured on the CPU in float32. Only
    # a float32 VAE has been measured: a float16 one would need the loss scaled (a mean over
    # this many pixels has gradients below its range).
    images = batch["image"].to(vae.device, vae.dtype)
    with torch.no_grad():
        encoded = vae.encode(images).latent_dist.mode().float()
    latents = encoded.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latents], lr=lr)
    trainable = [p.requires_grad for p in vae.parameters()]
    vae.requires_grad_(False)  # gradients for the latents alone
    try:
        rows, done = {}, 0
        for count in sorted(set(steps)):
            for _ in range(count - done):
                with torch.enable_grad():  # even where the caller turned gradients off
                    loss = F.mse_loss(vae.decode(latents.to(vae.dtype)).sample, images)
                    optimiser.zero_grad()
                    loss.backward()
                optimiser.step()
            done = count
            with torch.no_grad():
                decoded = vae.decode(latents.to(vae.dtype)).sample.clamp(-1, 1).float().cpu()
            where = speck_positions(decoded, foreground, background, requested)
            rows[str(count)] = {
                **_rates(decoded, foreground, background, requested),
                "positions": {p: where.count(p) for p in RIM_POSITIONS},
                "mse": F.mse_loss(decoded, batch["image"]).item(),
                "iou": fidelity(decoded, foreground, background, requested)["iou"].mean().item(),
                "latent_rms_moved": _rms(latents.detach() - encoded),
            }
    finally:
        for parameter, flag in zip(vae.parameters(), trainable):
            parameter.requires_grad_(flag)
    return {
        "samples": samples,
        "lr": lr,
        "latent_rms": _rms(encoded),
        "steps": rows,
    }


def fitted_latents_table(study: dict) -> str:
    """A :func:`fitted_latents_study` as a Markdown table, a row per count of steps."""
    rows = [
        "| latents | speck at the edge | at 10:30 | MSE | IoU | moved (RMS) |",
        "|---|---|---|---|---|---|",
    ]
    for count, measured in study["steps"].items():
        label = "the encoder's" if count == "0" else f"fitted, {count} steps"
        rows.append(
            f"| {label} | {measured['speck_rate_at_edge']:.1%} "
            f"| {measured['positions']['10:30']} | {measured['mse']:.4f} "
            f"| {measured['iou']:.3f} | {measured['latent_rms_moved']:.2f} |"
        )
    return "\n".join(rows)


def speck_report(
    pipe: StableDiffusionPipeline,
    decoders: dict[str, AutoencoderKL],
    samples: int = 200,
    seed: int = 0,
    sampler: dict = FULL_SAMPLER,
) -> dict:
    """Each decoder in ``decoders`` on the same latents: the reconstructions (``pipe``'s encoder,
    latent mode) of the first ``samples`` Fill images of the evaluation split, and the base's
    samples for their prompts (``sampler``, ``seed``). Speck rates at the circle's edge (the
    requested circle for a reconstruction, :func:`~cnet.world.evaluation.drawn_circle` for a sample)
    and away from it, with the reconstructions' mean squared error and fidelity IoU."""
    batch, foreground, background, requested = _fill_requests(samples)
    with torch.no_grad():
        encoded = (
            pipe.vae.encode(batch["image"]).latent_dist.mode() * pipe.vae.config.scaling_factor
        )
    sampled = generate(pipe, batch["prompt"], **sampler, seed=seed, latents=True)
    report = {}
    for name, vae in decoders.items():
        rebuilt, drawn = _decode(vae, encoded), _decode(vae, sampled)
        circle = drawn_circle(drawn, foreground)
        report[name] = {
            "reconstructions": {
                **_rates(rebuilt, foreground, background, requested),
                "mse": F.mse_loss(rebuilt, batch["image"]).item(),
                "iou": fidelity(rebuilt, foreground, background, requested)["iou"].mean().item(),
            },
            "samples": _rates(drawn, foreground, background, circle),
        }
    return report


def decoder_study(
    base: str | Path,
    settings: Settings,
    seeds: list[int],
    root: Path,
    samples: int = 200,
    command: str = "",
) -> dict:
    """``python -m cnet.world refine-decoder``: the base's decoder refined once per seed (run
    folders ``root/seed-<n>``), and every refined decoder measured beside the shipped one on the
    same latents (:func:`speck_report`)."""
    s = _check(settings)
    for seed in seeds:
        _check_run(base, _check(dataclasses.replace(s, seed=seed)), root / f"seed-{seed}")
    started = time.time()
    pipe = load_pipeline(base)
    decoders, runs = {"shipped": pipe.vae}, {}
    for seed in seeds:
        run_dir = root / f"seed-{seed}"
        vae, seconds = refine_decoder(base, dataclasses.replace(s, seed=seed), run_dir)
        decoders[f"seed {seed}"] = vae
        entries = [e for e in _latest_entries(run_dir / "log.jsonl") if e["stage"] == "refine"]
        last = entries[-100:]
        runs[f"seed {seed}"] = {
            "training_seconds": round(seconds, 1),
            "mse_last_100": sum(e["mse"] for e in last) / len(last),
        }
    report = speck_report(pipe, decoders, samples)
    return {
        "command": command,
        "base": str(base),
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k in _USED and k != "seed"},
        "seeds": seeds,
        "samples": samples,
        "sampler": f"DDIM, {FULL_SAMPLER['steps']} steps, "
        f"guidance {FULL_SAMPLER['guidance']}, seed 0",
        "speck_distance": SPECK_DISTANCE,
        "device": cpu_description(s.threads),
        "wall_time_s": {
            "refine": round(sum(r["training_seconds"] for r in runs.values()), 1),
            "this_invocation": round(time.time() - started, 1),
        },
        "runs": runs,
        "decoders": report,
    }


def speck_table(study: dict) -> str:
    """A :func:`decoder_study` as a Markdown table: each decoder's speck rates (the share of
    images with a speck), on the reconstructions and on the base's samples, with the
    reconstructions' mean squared error and fidelity IoU."""
    rows = [
        "| decoder | reconstructions: speck at the edge | away from it | MSE | IoU "
        "| samples: speck at the edge | away from it |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, measured in study["decoders"].items():
        rebuilt, drawn = measured["reconstructions"], measured["samples"]
        label = name if name == "shipped" else f"refined, {name}"
        rows.append(
            f"| {label} | {rebuilt['speck_rate_at_edge']:.1%} "
            f"| {rebuilt['speck_rate_away_from_edge']:.1%} | {rebuilt['mse']:.4f} "
            f"| {rebuilt['iou']:.3f} | {drawn['speck_rate_at_edge']:.1%} "
            f"| {drawn['speck_rate_away_from_edge']:.1%} |"
        )
    return "\n".join(rows)
