r"""The miniature Stable Diffusion: SD's parts, built from diffusers' and transformers' classes.

=====================  =============================  ======================================
part                   Stable Diffusion 1.5           miniature (this module)
=====================  =============================  ======================================
image                  512 x 512 RGB                  64 x 64 RGB
VAE (AutoencoderKL)    8x down, 4 latent channels     8x down, 4 latent channels (8 x 8)
tokenizer              CLIPTokenizer, 49408 BPE       CLIPTokenizer, our ~25 words, 16 tokens
text encoder           CLIPTextModel, 12 x 768        CLIPTextModel, 2 layers x 64
U-Net                  4 levels, 2 layers per level,  the same topology: CrossAttnDown x 3 +
                       cross-attention, 12 + 1        Down, UpBlock + CrossAttnUp x 3, 12 + 1
                       skip/middle features           skip/middle features, narrower
schedulers             DDPM (train), DDIM/PNDM        DDPM (train), DDIM (sampling), SD's
                       (sampling), scaled-linear      beta schedule
=====================  =============================  ======================================

Because the U-Net is a ``UNet2DConditionModel`` with SD's block layout and the VAE has SD's 8x
downsampling, a ControlNet built for it with plain defaults (diffusers'
``ControlNetModel.from_unet(unet)`` or cnet's ``ControlNet.from_unet(unet)``) is SD1.5's own
construction: the same 12 + 1 injection points and the released condition encoder with its
SD1.5 channels (16, 32, 96, 256) taking 64 px conditions to the 8 x 8 latents; only the widths
differ.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..settings import is_hub_id
from .data import COLOUR_NAMES, DEFAULT_RESOLUTION, SHAPES, check_resolution

__all__ = [
    "VOCABULARY",
    "MAX_PROMPT_TOKENS",
    "VAE_DOWNSAMPLING",
    "build_tokenizer",
    "build_text_encoder",
    "build_vae",
    "build_unet",
    "build_schedulers",
    "build_pipeline",
    "check_prompt",
    "encode_prompts",
]

# Every word a prompt of the world may use. The tokenizer knows nothing else, so an unknown word
# is an error (check_prompt), never a silent <|endoftext|>.
VOCABULARY: tuple[str, ...] = (*COLOUR_NAMES, *SHAPES, "with", "and", "background")
MAX_PROMPT_TOKENS = 16  # the longest prompt of the world, 3 shapes, needs 11 words + 2 markers
VAE_DOWNSAMPLING = 8
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# SD1.5's noise schedule (scheduler_config.json of runwayml/stable-diffusion-v1-5).
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)

# Widths of the miniature parts (SD1.5's are in the module docstring).
SIZES = {
    "small": dict(
        unet_channels=(32, 64, 64, 64), text_width=64, text_layers=2, vae_channels=(16, 32, 64, 64)
    ),
    "tiny": dict(
        unet_channels=(32, 32, 32, 32), text_width=32, text_layers=1, vae_channels=(16, 16, 16, 16)
    ),
}


def _bpe_tables(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """CLIP-style BPE vocabulary and merges that spell each word as one token ``word</w>``.

    CLIP's BPE starts from characters (the last one marked ``</w>``) and applies merges by rank.
    Each word gets the chain of merges that builds it from the right: ``d</w>``, then
    ``ed</w>``, then ``red</w>``; suffix tokens carry ``</w>``, so they never collide with
    another word's prefix, and every chain runs to the end.
    """
    chars = sorted({c for w in words for c in w})
    vocab = [BOS, EOS] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        suffix = word[-1] + "</w>"
        for c in reversed(word[:-1]):
            merge = f"{c} {suffix}"
            suffix = c + suffix
            if merge not in merges:
                merges.append(merge)
                vocab.append(suffix)
    vocab = list(dict.fromkeys(vocab))
    return {token: i for i, token in enumerate(vocab)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary is the world's words (:data:`VOCABULARY`), each one
    token, padded with ``<|endoftext|>`` to :data:`MAX_PROMPT_TOKENS`, as SD1.5's is to 77."""
    vocab, merges = _bpe_tables(VOCABULARY)
    with tempfile.TemporaryDirectory() as folder:
        # Built from files, the way SD's own tokenizer ships, so save/load is the tested path.
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            vocab=str(Path(folder) / "vocab.json"),
            merges=str(Path(folder) / "merges.txt"),
            model_max_length=MAX_PROMPT_TOKENS,
            unk_token=EOS,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
        )
    return tokenizer


def check_prompt(prompt: str, tokenizer: CLIPTokenizer) -> str:
    """Return ``prompt`` if every word is in the world's vocabulary and it fits the tokenizer's
    length; otherwise raise ValueError naming the unknown words or the length limit."""
    words = re.findall(r"\S+", prompt.lower())
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(
            f"unknown word(s) {unknown} in prompt {prompt!r}; the world's vocabulary is "
            f"{', '.join(VOCABULARY)}"
        )
    length = len(tokenizer(prompt).input_ids)
    if length > tokenizer.model_max_length:
        raise ValueError(
            f"prompt {prompt!r} has {length} tokens with start/end markers; the tokenizer takes "
            f"at most {tokenizer.model_max_length}"
        )
    return prompt


def encode_prompts(
    prompts: list[str], tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> torch.Tensor:
    """Text embeddings (B, tokens, width) exactly as ``StableDiffusionPipeline.encode_prompt``
    computes them (max-length padding, no attention mask, last hidden state), with gradients."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def build_text_encoder(tokenizer: CLIPTokenizer, size: str = "small") -> CLIPTextModel:
    """A small ``CLIPTextModel`` (randomly initialised) over the tokenizer's vocabulary."""
    width = SIZES[size]["text_width"]
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=SIZES[size]["text_layers"],
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae(size: str = "small", resolution: int = DEFAULT_RESOLUTION) -> AutoencoderKL:
    """A small ``AutoencoderKL`` with SD's geometry: 4 levels, so 3 downsamplings (8x), and 4
    latent channels; narrower than SD's (128, 256, 512, 512)."""
    check_resolution(resolution, VAE_DOWNSAMPLING)
    channels = SIZES[size]["vae_channels"]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=resolution,
    )


def build_unet(
    cross_attention_dim: int, size: str = "small", resolution: int = DEFAULT_RESOLUTION
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with SD1.5's topology: 4 levels (3 with cross-attention, the
    deepest without), 2 layers per level, a cross-attention middle block; 12 down features
    (conv_in, 2 per level, 3 downsamplers) + 1 middle feature, the ControlNet's 12 + 1
    injection points."""
    check_resolution(resolution, VAE_DOWNSAMPLING)
    return UNet2DConditionModel(
        sample_size=resolution // VAE_DOWNSAMPLING,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=SIZES[size]["unet_channels"],
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        # SD normalises in 32 groups over 8x8 or more pixels at its deepest level; here the
        # deepest level is 1x1, so a group must span several channels or GroupNorm would
        # reduce each one to its bias.
        norm_num_groups=8,
    )


def build_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    """SD1.5's schedule: DDPM to add noise in training, DDIM (SD's sampling settings) to sample."""
    ddpm = DDPMScheduler(**SCHEDULE)
    ddim = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)
    return ddpm, ddim


def build_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """Assemble the parts as diffusers' ``StableDiffusionPipeline`` (DDIM sampler, no safety
    checker), ready for ``save_pretrained`` / ``from_pretrained``."""
    _, ddim = build_schedulers()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@contextlib.contextmanager
def _loading_bars_off():
    """diffusers' and transformers' "Loading ..." bars off for the block (their only controls are
    global switches; each is put back as it was): loading a folder from disk is not news."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [m.is_progress_bar_enabled() for m in (diffusers_logging, transformers_logging)]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in zip((diffusers_logging, transformers_logging), was, strict=True):
            if enabled:
                module.enable_progress_bar()


def load_pipeline(path: str | Path, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """A diffusers ``StableDiffusionPipeline``: a folder (offline), or a hub id (``org/name``,
    downloaded where a hub is reachable, its safety checker left out: sampling here never runs
    it, and it would only take memory). Loaded quietly, its sampling bar off, on ``device``."""
    local = (Path(path) / "model_index.json").exists()
    if not local and not is_hub_id(str(path)):
        raise FileNotFoundError(
            f"expected a diffusers pipeline folder with model_index.json at {path}; build the "
            "miniature base with `python -m cnet.world pretrain`"
        )
    index = json.loads((Path(path) / "model_index.json").read_text()) if local else {}
    checker = (
        {}
        if local and not (index.get("safety_checker") or [None])[0]
        else {"safety_checker": None, "requires_safety_checker": False}
    )
    # the miniature models are small: loaded plainly rather than through the low-memory path
    with _loading_bars_off():
        pipe = StableDiffusionPipeline.from_pretrained(
            path, local_files_only=local, low_cpu_mem_usage=not local, **checker
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
