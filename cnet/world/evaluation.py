r"""How the locked base behaves: it draws what the prompt says, wherever it likes.

    python -m cnet.world evaluate --model models/miniature-sd --samples 200

Samples the pipeline (DDIM, with the full profile's evaluation sampler,
:func:`cnet.world.metrics.sampler_settings`) from prompts of the held-out eval split and
measures, exactly:

* **Fill prompts** ("<colour> circle with <colour> background"): are both colours drawn
  (:func:`~cnet.world.metrics.colours_drawn`: the background colour is the majority on the
  border, the foreground colour covers >= 1% of the image and most of what is not background);
  is the foreground a circle (its largest connected
  region is fitted best by a circle, among circle, square, triangle and diamond, with IoU
  >= 0.75 to the fitted circle); and the fidelity IoU (:func:`cnet.world.metrics.fidelity`,
  the one definition every ControlNet is measured with) with the circle of the eval sample the
  prompt came from, i.e. with a *random requested outline* the base never sees. That IoU is
  compared with its chance level: the same images against the other samples' requests. The IoU
  of the VAE's reconstruction of the eval image itself is the ceiling any U-Net (or ControlNet)
  on this VAE can reach.
* **Shapes prompts** with one shape: colours drawn, and shape accuracy (the best-fitting shape is
  the prompted one; chance 1/4). With several shapes: are all prompted colours drawn.

The numbers go to ``<model>/pretraining.json`` under ``"evaluation"`` with the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from .data import COLOUR_NAMES, SHAPES, FillDataset, ShapesDataset, check_resolution, colour_index
from .metrics import (
    FULL_SAMPLER,
    classify_colours,
    colours_drawn,
    fidelity,
    fit_shape,
    sampler_settings,
    vae_round_trip,
)
from .model import check_prompt, load_pipeline

__all__ = [
    "chance_iou",
    "drawn_circle",
    "evaluate_base",
    "evaluate_fill",
    "evaluate_shapes",
    "generate",
    "largest_region",
]

RECOGNISABLE_IOU = 0.75


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 0,
    batch_size: int = 100,
    resolution: int | None = None,
    progress: bool = False,
    latents: bool = False,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], on the CPU, sampled by the pipeline (its DDIM scheduler,
    on the pipeline's device) for ``prompts``, with one seeded generator per batch; with
    ``latents``, the latents those images are decoded from (scaled, as the U-Net samples them).
    ValueError for a prompt outside the world's vocabulary or longer than the tokenizer's
    length, or a resolution the VAE cannot divide."""
    for prompt in prompts:
        check_prompt(prompt, pipe.tokenizer)
    if resolution is not None:
        check_resolution(resolution, pipe.vae_scale_factor)
    pipe.set_progress_bar_config(disable=True)
    images = []
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="sampling", disable=not progress):
        out = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=torch.Generator().manual_seed(seed + start),
            output_type="latent" if latents else "pt",
        )
        # measured on the CPU, as the rest
        images.append((out.images if latents else out.images * 2 - 1).float().cpu())
    return torch.cat(images)


def largest_region(masks: torch.Tensor) -> torch.Tensor:
    """The largest 4-connected region of each mask (B, H, W): the shape drawn, without stray
    pixels of the same colour."""
    out = torch.zeros_like(masks, dtype=torch.bool)
    for b, mask in enumerate(masks.bool().numpy().astype(np.uint8)):
        count, labels = cv2.connectedComponents(mask, connectivity=4)
        if count > 1:
            sizes = np.bincount(labels.ravel())[1:]
            out[b] = torch.from_numpy(labels == 1 + sizes.argmax())
    return out


def drawn_circle(images: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """The circle each image (B, 3, H, W) drew, as a mask (B, H, W): the convex hull of the
    largest region of its prompted colour ``foreground`` (palette indices (B,)), so that a pixel
    of another colour on or inside the rim does not cut into it."""
    region = largest_region(classify_colours(images) == foreground[:, None, None])
    out = np.zeros(region.shape, dtype=np.uint8)
    for b, mask in enumerate(region.numpy()):
        points = np.argwhere(mask)[:, ::-1].astype(np.int32)  # (x, y), as OpenCV counts
        if len(points):
            cv2.fillConvexPoly(out[b], cv2.convexHull(points), 1)
    return torch.from_numpy(out.astype(bool))


def chance_iou(masks: torch.Tensor, others: torch.Tensor | None = None) -> float:
    """Mean IoU over all pairs (i, j), i != j, of ``masks`` with ``others`` (default: with
    itself): what a shape placed independently of the requested one scores."""
    others = masks if others is None else others
    a = masks.flatten(1).float()
    b = others.flatten(1).float()
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    values = intersection / union.clamp(min=1)
    off_diagonal = ~torch.eye(len(a), dtype=torch.bool)
    return float(values[off_diagonal].mean())


def _shape_report(images: torch.Tensor, colour_names: list[str], shapes: list[str]) -> dict:
    drawn = classify_colours(images)
    foreground = torch.stack([drawn[b] == colour_index(c) for b, c in enumerate(colour_names)])
    region = largest_region(foreground)
    fits = fit_shape(region)
    best = fits["iou"].max(dim=1).values
    correct = torch.tensor([f == s for f, s in zip(fits["shape"], shapes, strict=True)])
    return {
        "foreground": foreground,
        "correct_shape": correct,
        "recognisable": correct & (best >= RECOGNISABLE_IOU),
        "fit_iou": best,
    }


def evaluate_fill(
    pipe: StableDiffusionPipeline,
    samples: int = 200,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 0,
) -> tuple[dict, torch.Tensor]:
    """The base on Fill eval prompts: colour adherence, circle recognisability, and IoU with a
    random requested outline against its chance level (see module docstring). Returns the
    numbers and the generated images."""
    data = FillDataset(max(samples, 1000), split="eval")
    batch = data.batch(range(samples))
    words = [p.split() for p in batch["prompt"]]
    foreground = torch.tensor([colour_index(w[0]) for w in words])
    background = torch.tensor([colour_index(w[3]) for w in words])
    images = generate(pipe, batch["prompt"], steps, guidance, seed, progress=True)
    colours = colours_drawn(images, [[w[0]] for w in words], [w[3] for w in words])
    shape = _shape_report(images, [w[0] for w in words], ["circle"] * samples)
    requested = batch["layers"] > 0
    reference = _shape_report(batch["image"], [w[0] for w in words], ["circle"] * samples)
    drawn = classify_colours(images) == foreground[:, None, None]  # the fidelity's foreground
    # what the VAE alone keeps of the circle: the ceiling for any U-Net
    through_vae = vae_round_trip(pipe, batch["image"])
    return {
        "samples": samples,
        "colours_drawn_rate": colours["both_ok"].float().mean().item(),
        "foreground_colour_rate": colours["foreground_ok"].float().mean().item(),
        "background_colour_rate": colours["background_ok"].float().mean().item(),
        "recognisable_circle_rate": shape["recognisable"].float().mean().item(),
        "recognisable_circle_rate_of_dataset_images": reference["recognisable"]
        .float()
        .mean()
        .item(),
        "iou_with_requested_outline": fidelity(images, foreground, background, requested)["iou"]
        .mean()
        .item(),
        "iou_of_vae_reconstruction": fidelity(through_vae, foreground, background, requested)["iou"]
        .mean()
        .item(),
        "chance_iou_of_two_random_circles": chance_iou(requested),
        "chance_iou_generated_vs_other_requests": chance_iou(drawn, requested),
    }, images


def evaluate_shapes(
    pipe: StableDiffusionPipeline,
    samples: int = 200,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 0,
) -> dict:
    """The base on Shapes eval prompts: for one-shape prompts, colours drawn and shape accuracy;
    for several shapes, whether every prompted colour is drawn."""
    data = ShapesDataset(20_000, split="eval")
    scenes = data.scenes(range(4 * samples))
    counts = scenes.present.sum(1)
    single = np.flatnonzero(counts == 1)[:samples].tolist()
    several = np.flatnonzero(counts > 1)[:samples].tolist()
    report: dict = {}
    for name, indices in (("one_shape", single), ("several_shapes", several)):
        batch = data.batch(indices)
        sub = data.scenes(indices)
        fg = [
            [COLOUR_NAMES[c] for c, p in zip(sub.colour[b], sub.present[b], strict=True) if p]
            for b in range(len(indices))
        ]
        bg = [COLOUR_NAMES[c] for c in sub.background]
        images = generate(pipe, batch["prompt"], steps, guidance, seed + 10_000, progress=True)
        entry = {
            "samples": len(indices),
            "colours_drawn_rate": colours_drawn(images, fg, bg)["both_ok"].float().mean().item(),
        }
        if name == "one_shape":
            shapes = [SHAPES[s] for s in sub.shape[:, 0]]
            result = _shape_report(images, [f[0] for f in fg], shapes)
            entry["shape_accuracy"] = result["correct_shape"].float().mean().item()
            entry["shape_accuracy_by_shape"] = {  # which shapes the base gets wrong
                shape: result["correct_shape"][[s == shape for s in shapes]].float().mean().item()
                for shape in SHAPES
                if shape in shapes
            }
            entry["shape_accuracy_of_dataset_images"] = (
                _shape_report(batch["image"], [f[0] for f in fg], shapes)["correct_shape"]
                .float()
                .mean()
                .item()
            )
            entry["shape_accuracy_of_vae_reconstruction"] = (
                _shape_report(  # the ceiling
                    vae_round_trip(pipe, batch["image"]), [f[0] for f in fg], shapes
                )["correct_shape"]
                .float()
                .mean()
                .item()
            )
            entry["shape_accuracy_chance"] = 1 / len(SHAPES)
        report[name] = entry
    return report


def evaluate_base(
    model: str | Path, samples: int, profile: str = "full", seed: int = 0, command: str = ""
) -> dict:
    """``python -m cnet.world evaluate``: the base in ``model`` (a pipeline folder) on Fill and
    Shapes prompts of the evaluation split, with ``profile``'s evaluation sampler; recorded in
    ``<model>/pretraining.json`` under ``"evaluation"`` with ``command``, and returned."""
    model = Path(model)
    if not (model / "model_index.json").exists():
        raise FileNotFoundError(f"model: {model} is not a diffusers pipeline folder")
    sampler = sampler_settings(profile)
    pipe = load_pipeline(model)
    fill, _ = evaluate_fill(pipe, samples, seed=seed, **sampler)
    shapes = evaluate_shapes(pipe, samples, seed=seed, **sampler)
    result = {
        "command": command,
        "sampler": f"DDIM, {sampler['steps']} steps, guidance {sampler['guidance']}, "
        f"seed {seed} (profile {profile})",
        "fill": fill,
        "shapes": shapes,
    }
    record_path = model / "pretraining.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["evaluation"] = result
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return result
