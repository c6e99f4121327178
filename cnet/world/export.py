"""The world's scenes written out as a folder of image/condition pairs, in the layouts users
train from (:mod:`cnet.train.folders`): Fill50K's (the official tutorial's ``prompt.json`` with
``source/`` conditions and ``target/`` images) or the image folder diffusers' script reads
through Hugging Face ``datasets`` (``metadata.jsonl`` with ``file_name`` and
``conditioning_image_file_name`` paths and a ``text`` column, which ``datasets`` loads as the
``image``, ``conditioning_image`` and ``text`` columns the script's defaults name).

    python -m cnet.world export --layout tutorial --samples 1000 --out data/fill-tutorial
    python -m cnet.world export --layout imagefolder --task canny --out data/canny-folder

A folder made here trains exactly what the same task trains from the world directly, through
the path a user's own data takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DEFAULT_RESOLUTION, FillDataset, ShapesDataset

__all__ = ["LAYOUTS", "export_folder"]

LAYOUTS = ("tutorial", "imagefolder")


def _png(tensor, path: Path, signed: bool) -> None:
    values = (tensor.clamp(-1, 1) + 1) * 127.5 if signed else tensor.clamp(0, 1) * 255
    Image.fromarray(values.round().byte().permute(1, 2, 0).numpy().astype(np.uint8)).save(path)


def export_folder(
    out: str | Path,
    layout: str = "tutorial",
    samples: int = 1000,
    task: str = "fill",
    resolution: int = DEFAULT_RESOLUTION,
    seed: int = 0,
    chunk: int = 256,
) -> Path:
    """Write ``samples`` scenes of ``task`` ("fill" or a Shapes condition) as PNG pairs in
    ``layout``; returns the folder (which must not exist yet or be empty)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not allowed; expected one of {', '.join(LAYOUTS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out: {out} exists and is not empty; export into a new folder")
    condition = "outline" if task == "fill" else task
    dataset = (FillDataset if task == "fill" else ShapesDataset)(
        size=samples, split="train", resolution=resolution, seed=seed
    )
    folders = ("source", "target") if layout == "tutorial" else ("conditioning_images", "images")
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, samples, chunk):
        batch = dataset.batch(list(range(start, min(samples, start + chunk))))
        for j, prompt in enumerate(batch["prompt"]):
            i = start + j
            cond, image = f"{folders[0]}/{i}.png", f"{folders[1]}/{i}.png"
            _png(batch[condition][j], out / cond, signed=False)
            _png(batch["image"][j], out / image, signed=True)
            rows.append(
                {"source": cond, "target": image, "prompt": prompt}
                if layout == "tutorial"
                else {"file_name": image, "conditioning_image_file_name": cond, "text": prompt}
            )
    listing = "prompt.json" if layout == "tutorial" else "metadata.jsonl"
    (out / listing).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
