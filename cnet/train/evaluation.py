"""Condition fidelity, one definition for every number cnet quotes.

A sample follows a Fill (or Shapes) condition as well as the pixels drawn in the prompted
foreground colour cover the region the condition encloses:

* **IoU**: :math:`|F \\cap R| / |F \\cup R|`, where :math:`F` is every pixel whose nearest palette
  colour is the prompted foreground colour (:func:`cnet.world.metrics.classify_colours`) and
  :math:`R` the region inside the requested outline. Stray pixels of that colour count against
  the sample, as a missing part of the disc does.
* **colours_ok**: both prompted colours drawn (:func:`cnet.world.metrics.colours_drawn`).
* **layout_iou**: the same IoU with :math:`F` the pixels of whichever colour fills :math:`R` most
  (:func:`cnet.world.metrics.layout_iou`): the fidelity of a sample made without a prompt.

Colours are named in the palette of the data's style (:data:`cnet.world.data.STYLES`): a base
fine-tuned to another palette is measured in that palette.

The base alone (``python -m cnet.world evaluate``), every evaluation of a training run
(``log.jsonl``, ``run.json``) and the notebooks all call :func:`fidelity`, and sample with the
sampler of a profile (:func:`sampler_settings`: DDIM, ``eval_steps`` steps, classifier-free
guidance ``guidance_scale``).

Data from a folder has no exact ground truth. Its validation (:func:`validate`) measures what a
user can check on any edge-like condition (Canny edges, outlines, scribbles, Fill50K):
**edge_f1**, the F1 of the sample's Canny edges (OpenCV, the released annotator's thresholds)
against the condition's lines within 2 pixels, beside the same score of the held-out images
themselves (**edge_f1_images**, the most a perfect sample reaches).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ..controlnet import ControlNet
from ..injection import ControlledUNet
from ..sample import sample
from ..world.data import canny_edges
from ..world.metrics import FULL_SAMPLER, edge_f1, fidelity, sampler_settings, vae_round_trip
from .config import SettingError, TrainConfig
from .data import CachedData, cache_data, task_dataset
from .models import load_base

__all__ = [
    "FULL_SAMPLER",
    "edge_reconstruction_f1",
    "evaluate",
    "fidelity",
    "measure_controlnet",
    "measure_folder",
    "sample_files",
    "sample_set",
    "sampler_settings",
    "vae_round_trip",
    "validate",
    "validation_grid",
]


@torch.no_grad()
def sample_set(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet | None,
    prompts: list[str],
    conditions: torch.Tensor | list[torch.Tensor] | None,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 1234,
    batch_size: int = 64,
    **control,
) -> torch.Tensor:
    """:func:`cnet.sample` over a whole set in batches, the starting noise of the batch from
    index ``start`` seeded by ``seed + start`` (so a set's images do not depend on what else is
    sampled); ``conditions``: one tensor, or one per ControlNet. Images (N, 3, H, W) on the CPU."""
    images = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        batch = (
            [c[start:end] for c in conditions]
            if isinstance(conditions, (list, tuple))
            else None
            if conditions is None
            else conditions[start:end]
        )
        g = torch.Generator(pipe.unet.device).manual_seed(seed + start)
        images.append(
            sample(
                pipe,
                controlled,
                prompts[start:end],
                batch,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=g,
                **control,
            )
            .float()
            .cpu()
        )
    return torch.cat(images)


@torch.no_grad()
def evaluate(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet | None,
    data: CachedData,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 1234,
    batch_size: int = 64,
    prompt_free: bool = False,
    **control,
) -> tuple[dict, torch.Tensor]:
    """Sample the evaluation set (its prompts and conditions) with fixed seeds and measure
    :func:`fidelity`. ``controlled=None`` measures the base alone; ``control`` goes to
    :func:`cnet.sample` (``scales``, ``guess_mode``, ``control_guidance_start``, ...). Returns
    the mean IoU, the share of samples with both colours right, the count, and the images
    (N, 3, H, W). ``prompt_free`` samples every condition with the empty prompt instead and
    returns only what can be measured without one: the mean ``layout_iou`` and the count."""
    prompts = [""] * len(data.extras["prompt"]) if prompt_free else data.extras["prompt"]
    images = sample_set(
        pipe, controlled, prompts, data.condition, steps, guidance, seed, batch_size, **control
    )
    per_image = fidelity(
        images,
        data.extras["foreground"],
        data.extras["background"],
        data.extras["region"],
        data.extras.get("style", "plain"),
    )
    if prompt_free:
        return {"layout_iou": float(per_image["layout_iou"].mean()), "n": len(images)}, images
    metrics = {
        "iou": float(per_image["iou"].mean()),
        "colours_ok": float(per_image["colours_ok"].float().mean()),
        "layout_iou": float(per_image["layout_iou"].mean()),
        "n": len(images),
    }
    return metrics, images


@torch.no_grad()
def measure_controlnet(
    pipe: StableDiffusionPipeline,
    controlnet: ControlNet,
    task: str,
    samples: int = 200,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 0,
    style: str = "plain",
) -> dict:
    """A ControlNet, the base alone and the VAE's ceiling on the same ``samples`` evaluation
    conditions, by :func:`fidelity`: the ceiling is the IoU of the evaluation images themselves
    after :func:`vae_round_trip` (as ``python -m cnet.world evaluate`` measures the base's
    ceiling), the most any model sampling latents can reach. ``style``: the palette the base
    paints in (a fine-tuned variant's), which the images are rendered and measured in."""
    data = cache_data(pipe, task, samples, "eval", seed, style=style)
    base, _ = evaluate(pipe, None, data, steps, guidance)
    controlled = ControlledUNet(pipe.unet, controlnet.to(pipe.unet.device)).eval()
    trained, _ = evaluate(pipe, controlled, data, steps, guidance)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = task_dataset(task, samples, "eval", resolution, seed, style)
    ceiling = fidelity(
        vae_round_trip(pipe, dataset.batch(range(samples))["image"]),
        data.extras["foreground"],
        data.extras["background"],
        data.extras["region"],
        style,
    )
    return {
        "task": task,
        "samples": samples,
        "style": style,
        "sampler": f"DDIM, {steps} steps, guidance {guidance}",
        "controlnet": trained,
        "base": base,
        "vae_ceiling": {
            "iou": float(ceiling["iou"].mean()),
            "colours_ok": float(ceiling["colours_ok"].float().mean()),
        },
    }


def measure_folder(
    folder: str | Path,
    weights: str = "latest",
    base: str | None = None,
    samples: int = 200,
    profile: str = "full",
    command: str = "",
    seed: int = 0,
) -> dict:
    """``python -m cnet evaluate``: the ControlNet in ``folder`` (a run's ``weights``, latest or
    best, or a shipped folder), measured by :func:`measure_controlnet` on ``base`` (default: the
    base it was trained on) with ``profile``'s sampler, on the evaluation conditions of ``seed``
    (a training run of that seed evaluates on the first of them), and recorded in the folder's
    ``run.json`` under ``"evaluation"`` (with ``command``). Returns that record."""
    from ..world.finetune import style_of
    from .runs import load_controlnet

    folder = Path(folder)
    controlnet = load_controlnet(folder, weights)  # one line for a wrong folder
    record_path = folder / "run.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    config = record.get("config", {})
    base = base or config.get("base", TrainConfig.base)
    torch.manual_seed(0)
    result = measure_controlnet(
        load_base(base),
        controlnet,
        config.get("task", "fill"),
        samples,
        **sampler_settings(profile),
        seed=seed,
        style=style_of(base),
    )
    record["evaluation"] = {
        "command": command,
        "base_model": str(base),
        "weights": weights,
        "seed": seed,  # whose evaluation conditions
        **result,
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record["evaluation"]


def edge_reconstruction_f1(
    images: torch.Tensor, conditions: torch.Tensor, tolerance: int = 2
) -> torch.Tensor:
    """Per image: F1 of the Canny edges of ``images`` (N, 3, H, W) in [-1, 1] against the
    lines of ``conditions`` (N, 3, H, W) in [0, 1] (pixels brighter than 0.5)."""
    rgb = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    edges = torch.from_numpy(canny_edges(rgb.permute(0, 2, 3, 1).numpy()))
    return edge_f1(edges, conditions.mean(1) > 0.5, tolerance)


@torch.no_grad()
def validate(
    pipe: StableDiffusionPipeline,
    controlled: ControlledUNet,
    validation: dict,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 1234,
) -> tuple[dict, torch.Tensor]:
    """Sample a folder's held-out pairs (their prompts and conditions) with fixed seeds and
    measure :func:`edge_reconstruction_f1`, for the samples and for the held-out images."""
    images = sample_set(
        pipe, controlled, validation["prompt"], validation["condition"], steps, guidance, seed
    )
    ceiling = edge_reconstruction_f1(validation["image"] * 2 - 1, validation["condition"])
    return {
        "edge_f1": float(edge_reconstruction_f1(images, validation["condition"]).mean()),
        "edge_f1_images": float(ceiling.mean()),
        "n": len(images),
    }, images


def validation_grid(conditions: torch.Tensor, images: torch.Tensor, columns: int = 8) -> Image:
    """A grid for a person to judge convergence by: each condition (in [0, 1]) above the sample
    made from it (in [-1, 1]), ``columns`` pairs a row."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * 2 * h, min(n, columns) * w, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[2 * r * h : (2 * r + 1) * h, c * w : (c + 1) * w] = (
            (conditions[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        )
        grid[(2 * r + 1) * h : (2 * r + 2) * h, c * w : (c + 1) * w] = (
            ((images[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        )
    return Image.fromarray(grid)


def sample_files(
    controlnet: str | Path,
    condition_files: list[str],
    prompts: list[str],
    out: str | Path,
    weights: str = "latest",
    base: str | None = None,
    steps: int = FULL_SAMPLER["steps"],
    guidance: float = FULL_SAMPLER["guidance"],
    seed: int = 0,
    scale: float = 1.0,
) -> tuple[str, torch.Tensor]:
    """``python -m cnet sample``: the ControlNet in ``controlnet`` (a run's ``weights`` or a
    shipped folder) on the base it names (or ``base``), one sample per condition image file,
    with one prompt for all or one each; the grid (:func:`validation_grid`) written to ``out``.
    Returns the base and each sample's :func:`edge_reconstruction_f1`."""
    from .folders import load_image
    from .runs import base_of, load_controlnet

    if len(prompts) not in (1, len(condition_files)):
        raise SettingError(
            f"prompt: {len(prompts)} prompts for {len(condition_files)} "
            "conditions; expected one prompt, or one per condition"
        )
    model = load_controlnet(Path(controlnet), weights)  # one line for a wrong folder
    base = base or base_of(Path(controlnet))
    pipe = load_base(base, "cuda" if torch.cuda.is_available() else "cpu")
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    conditions = torch.stack([load_image(Path(c), resolution) for c in condition_files])
    controlled = ControlledUNet(pipe.unet, model.to(pipe.unet.device)).eval()
    prompts = prompts * len(conditions) if len(prompts) == 1 else prompts
    images = sample_set(
        pipe, controlled, prompts, conditions, steps, guidance, seed=seed, scales=scale
    )
    validation_grid(conditions, images).save(out)
    return base, edge_reconstruction_f1(images, conditions)
