"""Training data from a folder of image/condition pairs, in the two layouts people already have.

* **The official tutorial's** (lllyasviel/ControlNet ``tutorial_dataset.py``, e.g. Fill50K):
  ``prompt.json``, one JSON object a line, ``{"source": "source/0.png", "target":
  "target/0.png", "prompt": "..."}``; ``source`` is the condition, ``target`` the image, paths
  relative to the folder.
* **diffusers' image folder** (``train_controlnet.py --train_data_dir``): ``metadata.jsonl``,
  one JSON object a line with an image, a conditioning image and a caption column (by default
  ``image``, ``conditioning_image``, ``text``; ``--image_column``,
  ``--conditioning_image_column``, ``--caption_column`` name others, as in diffusers' script).

Images are resized (shorter side to the base's resolution, bilinear) and centre-cropped, as
diffusers' script does; conditions go to [0, 1], images to [−1, 1].

The frozen work is cached to disk once (:func:`cache_folder`): the VAE's latent mean and std of
every image (float32) and the text embedding of every distinct prompt (float16, as SD's text
encoder is usually run), in safetensors shards of
``SHARD`` samples under ``<run>/cache``. Each shard is written whole or not at all, so an
interrupted caching resumes at the first missing shard. Steps then read the rows they draw
from the shards (:class:`ShardedRows`) and the conditions from the image files
(:class:`ConditionFiles`): memory holds a batch, not the data set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import SettingError

__all__ = [
    "SHARD",
    "ConditionFiles",
    "FolderData",
    "FolderPairs",
    "ShardedRows",
    "cache_folder",
    "folder_data",
    "load_image",
    "read_folder",
]

SHARD = 256  # samples per cache shard


@dataclass
class FolderPairs:
    """The pairs a folder lists: image path, condition path and prompt of each sample."""

    root: Path
    layout: str  # "tutorial" (prompt.json) or "imagefolder" (metadata.jsonl)
    images: list[Path]
    conditions: list[Path]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, start: int, stop: int) -> FolderPairs:
        return FolderPairs(
            self.root,
            self.layout,
            self.images[start:stop],
            self.conditions[start:stop],
            self.prompts[start:stop],
        )

    def fingerprint(self) -> str:
        """Changes when the list of pairs or their prompts change (a cache is then stale)."""
        text = json.dumps(
            [
                [str(i), str(c), p]
                for i, c, p in zip(self.images, self.conditions, self.prompts, strict=True)
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_folder(
    path: str | Path,
    image_column: str = "image",
    conditioning_image_column: str = "conditioning_image",
    caption_column: str = "text",
) -> FolderPairs:
    """The pairs of a folder in either layout; one clear line for a wrong folder, a missing
    column or a missing file, before any image is read."""
    root = Path(path)
    if not root.is_dir():
        raise SettingError(
            f"data: {str(path)!r} is not a folder; expected a folder with "
            "prompt.json (official tutorial layout) or metadata.jsonl "
            "(diffusers' image folder)"
        )
    if (root / "prompt.json").is_file():
        layout, listing, keys = "tutorial", root / "prompt.json", ("target", "source", "prompt")
    elif (root / "metadata.jsonl").is_file():
        layout, listing = "imagefolder", root / "metadata.jsonl"
        keys = (image_column, conditioning_image_column, caption_column)
    else:
        raise SettingError(
            f"data: {root} has neither prompt.json (official tutorial layout) "
            "nor metadata.jsonl (diffusers' image folder)"
        )
    images, conditions, prompts = [], [], []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{listing}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SettingError(f"data: {where} is not JSON ({error.msg})") from None
        keys = tuple(_file_name_column(k, row) for k in keys)
        missing = [k for k in keys if k not in row]
        if missing:
            flags = {
                image_column: "--image_column",
                conditioning_image_column: "--conditioning_image_column",
                caption_column: "--caption_column",
            }
            hint = "" if layout == "tutorial" else f" (or name it with {flags[missing[0]]})"
            raise SettingError(
                f"data: {where} has no {missing[0]!r} column; it has {', '.join(sorted(row))}{hint}"
            )
        image, condition = root / row[keys[0]], root / row[keys[1]]
        for kind, file in (("image", image), ("condition", condition)):
            if not file.is_file():
                raise SettingError(f"data: {where}: the {kind} file {file} does not exist")
        images.append(image)
        conditions.append(condition)
        prompts.append(str(row[keys[2]]))
    if not images:
        raise SettingError(f"data: {listing} lists no pairs")
    return FolderPairs(root, layout, images, conditions, prompts)


def _file_name_column(key: str, row: dict) -> str:
    """A Hugging Face ``datasets`` image folder names its image column ``file_name`` and other
    image columns ``<name>_file_name``; either stands for the column asked for."""
    if key in row:
        return key
    for alias in ("file_name" if key == "image" else None, f"{key}_file_name"):
        if alias and alias in row:
            return alias
    return key


def load_image(path: Path, resolution: int, partner: Path | None = None) -> torch.Tensor:
    """An RGB image file as (3, resolution, resolution) float in [0, 1]: shorter side resized
    to ``resolution`` (bilinear), then centre-cropped. ``partner``: the other file of its pair,
    which must have the same size (a condition drawn for another image does not fit it)."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise SettingError(f"data: {path} is not an image that can be read ({error})") from None
    if partner is not None:
        with Image.open(partner) as other:
            if other.size != image.size:
                raise SettingError(
                    f"data: {path} is {image.size[0]}x{image.size[1]} but its pair "
                    f"{partner} is {other.size[0]}x{other.size[1]}; an image and "
                    "its condition must have the same size"
                )
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize(
        (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR
    )
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


class ConditionFiles:
    """The conditions of a folder, read from their files when a step draws them: indexing with
    a tensor of sample indices gives (B, 3, R, R) in [0, 1]."""

    def __init__(self, pairs: FolderPairs, resolution: int):
        self.pairs, self.resolution = pairs, resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [load_image(self.pairs.conditions[int(i)], self.resolution) for i in index.reshape(-1)]
        )


class ShardedRows:
    """Rows of one tensor stored across cache shards (``key`` in each), read on demand."""

    def __init__(self, shards: list[Path], key: str, rows_per_shard: int):
        self.shards, self.key, self.rows = shards, key, rows_per_shard
        self._open: dict[int, object] = {}

    def _shard(self, k: int):
        if k not in self._open:
            self._open[k] = safe_open(str(self.shards[k]), "pt")
        return self._open[k]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in index.reshape(-1).tolist():
            shard, row = divmod(int(i), self.rows)
            rows.append(self._shard(shard).get_slice(self.key)[row : row + 1])
        return torch.cat(rows).float()


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    tmp.replace(path)


def _shard_valid(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("fingerprint") == fingerprint


@torch.no_grad()
def cache_folder(pipe, pairs: FolderPairs, cache: Path, chunk: int | None = None) -> dict:
    """Encode every image of ``pairs`` with the frozen VAE and every distinct prompt with the
    frozen text encoder, into ``cache`` (shards of ``SHARD`` samples; a shard already there for
    the same pairs, base and resolution is kept). Returns what :class:`FolderData` reads."""
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # the VAE's activations grow with the pixels: 32 images of 64 px, 1 of 512 px a chunk
    chunk = chunk or max(1, 32 * 64**2 // resolution**2)
    fingerprint = f"{pairs.fingerprint()}-{resolution}-{_base_fingerprint(pipe)}"
    cache.mkdir(parents=True, exist_ok=True)
    device = pipe.unet.device
    names = [cache / f"latents_{k:05d}.safetensors" for k in range(0, len(pairs), SHARD)]
    todo = [k for k, p in enumerate(names) if not _shard_valid(p, fingerprint)]
    for k in tqdm(todo, desc="caching latents", disable=not todo, mininterval=1.0):
        start = k * SHARD
        stop = min(len(pairs), start + SHARD)
        means, stds = [], []
        for i in range(start, stop, chunk):
            batch = (
                torch.stack(
                    [
                        load_image(pairs.images[j], resolution, pairs.conditions[j])
                        for j in range(i, min(stop, i + chunk))
                    ]
                )
                * 2
                - 1
            )
            dist = pipe.vae.encode(batch.to(device, pipe.vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        _write_atomic(
            {"mean": torch.cat(means), "std": torch.cat(stds)},
            names[k],
            {"fingerprint": fingerprint},
        )
    distinct = [""] + sorted(set(pairs.prompts) - {""})
    prompt_names = [cache / f"prompts_{k:05d}.safetensors" for k in range(0, len(distinct), SHARD)]
    for k, path in enumerate(prompt_names):
        if not _shard_valid(path, fingerprint):
            texts = distinct[k * SHARD : (k + 1) * SHARD]
            embeds = pipe.encode_prompt(texts, device, 1, False)[0].float().cpu()
            _write_atomic({"embeddings": embeds.half()}, path, {"fingerprint": fingerprint})
    lookup = {p: i for i, p in enumerate(distinct)}
    return {
        "latent_shards": names,
        "prompt_shards": prompt_names,
        "prompts": distinct,
        "prompt_index": torch.tensor([lookup[p] for p in pairs.prompts]),
    }


def _base_fingerprint(pipe) -> str:
    """Which frozen VAE and text encoder made a cache: a digest of a few of their weights."""
    digest = hashlib.sha256()
    for module in (pipe.vae, pipe.text_encoder):
        for _, tensor in list(module.state_dict().items())[:4]:
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class FolderData:
    """A folder's training set as :func:`cnet.train.data.draw_batch` reads it (the fields of
    :class:`~cnet.train.data.CachedData`), its rows read from the cache and the files on demand."""

    latent_mean: ShardedRows
    latent_std: ShardedRows
    condition: ConditionFiles
    prompt_index: torch.Tensor
    embeddings: ShardedRows
    prompts: list[str]
    extras: dict


def folder_data(pipe, config, cache: Path) -> tuple[FolderData, dict]:
    """The training set and the validation set of ``config.data``: the last
    ``config.eval_size`` pairs are held out for validation (never trained on); returns the
    training set and the validation set (its conditions in memory, its prompts)."""
    pairs = read_folder(
        config.data, config.image_column, config.conditioning_image_column, config.caption_column
    )
    if len(pairs) <= config.eval_size:
        raise SettingError(
            f"eval_size: {config.eval_size} is not allowed for {config.data} "
            f"({len(pairs)} pairs); expected fewer than the pairs, the rest "
            "trains"
        )
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    train_pairs = pairs.subset(0, len(pairs) - config.eval_size)
    cached = cache_folder(pipe, train_pairs, cache)
    data = FolderData(
        latent_mean=ShardedRows(cached["latent_shards"], "mean", SHARD),
        latent_std=ShardedRows(cached["latent_shards"], "std", SHARD),
        condition=ConditionFiles(train_pairs, resolution),
        prompt_index=cached["prompt_index"],
        embeddings=ShardedRows(cached["prompt_shards"], "embeddings", SHARD),
        prompts=cached["prompts"],
        extras={"layout": pairs.layout},
    )
    held_out = pairs.subset(len(pairs) - config.eval_size, len(pairs))
    validation = {
        "condition": torch.stack([load_image(c, resolution) for c in held_out.conditions]),
        "prompt": held_out.prompts,
        "image": torch.stack([load_image(i, resolution) for i in held_out.images]),
    }
    return data, validation
