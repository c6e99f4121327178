"""Weights across the three layouts: official lllyasviel checkpoints <-> cnet <-> diffusers.

* **Official** (cldm/cldm.py, the ``control_sd15_*.pth`` files): keys ``control_model.*`` in
  the ldm layout: ``time_embed.{0,2}``, ``input_blocks.N.{0,1}`` (resnet, transformer),
  ``input_blocks.N.0.op`` (downsampler), ``middle_block.{0,1,2}``, ``input_hint_block.{0..14}``
  (every other index: the SiLUs hold no weights), ``zero_convs.N.0``, ``middle_block_out.0``.
  Full-model checkpoints also hold the SD weights (``model.diffusion_model.*``, VAE, text
  encoder), which a ControlNet ignores.
* **cnet** (:class:`cnet.ControlNet`): diffusers' module names for the trainable copy, plus
  ``hint_encoder``, ``zero_convs.N``, ``mid_zero_conv``.
* **diffusers** (``ControlNetModel``): the same, with ``controlnet_cond_embedding``,
  ``controlnet_down_blocks.N``, ``controlnet_mid_block``.

The official <-> diffusers renaming is the inverse of diffusers' own converter
(``convert_ldm_unet_checkpoint(..., controlnet=True)`` in
``diffusers/pipelines/stable_diffusion/convert_from_ckpt.py``); cnet derives it from the
ControlNet's modules, so any number of levels and layers maps. Files are written as
safetensors; .pth files are read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from .block import trainable_copy
from .controlnet import MIRRORED_DOWN_BLOCKS, MIRRORED_MID_BLOCKS, ControlNet
from .hint import PaperHintEncoder, ReleasedHintEncoder

__all__ = [
    "OFFICIAL_PREFIX",
    "diffusers_config",
    "from_diffusers",
    "from_official",
    "to_diffusers",
    "load_official_state_dict",
    "official_key_map",
    "read_official_weights",
    "save_official",
    "to_official_state_dict",
]

OFFICIAL_PREFIX = "control_model."

# diffusers ResnetBlock2D -> ldm ResBlock (inverse of convert_from_ckpt.renew_resnet_paths)
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# cnet names -> diffusers ControlNetModel names; everything else is shared.
_CNET_TO_DIFFUSERS = (
    ("hint_encoder.", "controlnet_cond_embedding."),
    ("zero_convs.", "controlnet_down_blocks."),
    ("mid_zero_conv.", "controlnet_mid_block."),
)

# Settings diffusers' ControlNetModel.from_unet does not carry over (it would build a different
# network), with the value it assumes.
_DIFFUSERS_ASSUMES: dict[str, Any] = {
    "conv_in_kernel": 3,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "dual_cross_attention": False,
    "attention_type": "default",
    "cross_attention_norm": None,
    "mid_block_only_cross_attention": None,
}

_MAX_LISTED = 20


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _check_state_dict(
    what: str,
    given: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    shown_name: Mapping[str, str] | None = None,
) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys (in the given
    layout's names)."""
    name = shown_name or {}
    missing = [name.get(k, k) for k in expected if k not in given]
    unexpected = [name.get(k, k) for k in given if k not in expected]
    misshaped = [
        f"{name.get(k, k)}: expected {tuple(expected[k])}, got {tuple(v.shape)}"
        for k, v in given.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    if missing or unexpected or misshaped:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped keys", misshaped),
            )
            if items
        ]
        raise ValueError(f"{what} does not fit: " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# cnet <-> diffusers
# --------------------------------------------------------------------------------------------


def _to_diffusers_key(key: str) -> str:
    for ours, theirs in _CNET_TO_DIFFUSERS:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def _from_diffusers_key(key: str) -> str:
    for ours, theirs in _CNET_TO_DIFFUSERS:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def diffusers_config(controlnet: ControlNet) -> dict[str, Any]:
    """The ``ControlNetModel`` configuration of ``controlnet``: diffusers' own mirroring of the
    U-Net it was copied from (``ControlNetModel.from_unet`` on the meta device, no memory), with
    this ControlNet's condition encoder. ValueError where diffusers cannot express it."""
    if isinstance(controlnet.hint_encoder, PaperHintEncoder):
        raise ValueError(
            "diffusers' ControlNetModel holds the released condition encoder only "
            "(ControlNetConditioningEmbedding: 3x3 convs, SiLU); this ControlNet uses the "
            "paper's (4x4 convs, ReLU). Build it with hint_encoder='released' to export."
        )
    config = controlnet.unet_config
    unsupported = [
        f"{key}={config.get(key)!r} (diffusers assumes {value!r})"
        for key, value in _DIFFUSERS_ASSUMES.items()
        if config.get(key, value) != value
    ]
    for key in ("layers_per_block", "cross_attention_dim"):
        if not isinstance(config.get(key), int):
            unsupported.append(f"{key}={config.get(key)!r} (diffusers needs one int)")
    if unsupported:
        raise ValueError("ControlNetModel cannot express this U-Net: " + "; ".join(unsupported))
    hint = controlnet.hint_encoder
    with torch.device("meta"):
        reference = ControlNetModel.from_unet(
            UNet2DConditionModel.from_config(config),
            conditioning_embedding_out_channels=hint.channels,
            conditioning_channels=hint.condition_channels,
            load_weights_from_unet=False,
        )
    kwargs = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    kwargs["global_pool_conditions"] = controlnet.global_pool
    return kwargs


def to_diffusers(controlnet: ControlNet) -> ControlNetModel:
    """A diffusers ``ControlNetModel`` holding a copy of ``controlnet``'s weights.

    Its ``forward(..., conditioning_scale=s, guess_mode=g)`` gives the residuals of
    ``controlnet.residuals(..., scale=s, guess_mode=g, guess_rule="diffusers")``.
    """
    config = diffusers_config(controlnet)
    weight = controlnet.conv_in.weight
    model = ControlNetModel(**config)
    if (model.conv_in.weight.device, model.conv_in.weight.dtype) != (weight.device, weight.dtype):
        model = model.to(device=weight.device, dtype=weight.dtype)
    state = {_to_diffusers_key(k): v for k, v in controlnet.state_dict().items()}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_state_dict("this ControlNet's weights, for diffusers' ControlNetModel", state, expected)
    model.load_state_dict(state, strict=True)
    return model.train(controlnet.training)


def _check_diffusers_mirrorable(model: ControlNetModel) -> None:
    if not isinstance(model, ControlNetModel):
        raise ValueError(f"expected a diffusers ControlNetModel, got {type(model).__name__}")
    config = model.config
    problems = [
        f"{key}={config.get(key)!r} (expected None)"
        for key in (
            "class_embed_type",
            "num_class_embeds",
            "addition_embed_type",
            "encoder_hid_dim_type",
        )
        if config.get(key) is not None
    ]
    if config.controlnet_conditioning_channel_order != "rgb":
        problems.append(
            f"controlnet_conditioning_channel_order={config.controlnet_conditioning_channel_order!r}"
            " (expected 'rgb'; flip the condition's channels instead)"
        )
    problems += [
        f"down_block_types[{i}]={kind!r} (expected one of {MIRRORED_DOWN_BLOCKS})"
        for i, kind in enumerate(config.down_block_types)
        if kind not in MIRRORED_DOWN_BLOCKS
    ]
    if config.mid_block_type not in MIRRORED_MID_BLOCKS:
        problems.append(
            f"mid_block_type={config.mid_block_type!r} (expected one of {MIRRORED_MID_BLOCKS})"
        )
    if problems:
        raise ValueError("cnet cannot mirror this ControlNetModel: " + "; ".join(problems))


# The U-Net settings a ControlNetModel's config repeats (the ones ControlNetModel.from_unet copies)
_UNET_SETTINGS = frozenset(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


def _unet_config_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The U-Net settings a ControlNetModel's config repeats, with the decoder the U-Net must have
    had (its up blocks mirror the down blocks), so the U-Net can be rebuilt for export."""
    unet_config = {k: v for k, v in config.items() if k in _UNET_SETTINGS}
    up = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    unet_config["up_block_types"] = tuple(up[k] for k in reversed(config["down_block_types"]))
    return unet_config


def from_diffusers(model: ControlNetModel) -> ControlNet:
    """A :class:`cnet.ControlNet` with a copy of a diffusers ``ControlNetModel``'s weights."""
    _check_diffusers_mirrorable(model)
    config = model.config
    weight = model.conv_in.weight
    hint = ReleasedHintEncoder(
        out_channels=config.block_out_channels[0],
        condition_channels=config.conditioning_channels,
        channels=tuple(config.conditioning_embedding_out_channels),
    ).to(device=weight.device, dtype=weight.dtype)
    controlnet = ControlNet(
        conv_in=trainable_copy(model.conv_in),
        time_proj=trainable_copy(model.time_proj),
        time_embedding=trainable_copy(model.time_embedding),
        down_blocks=trainable_copy(model.down_blocks),
        mid_block=trainable_copy(model.mid_block),
        hint_encoder=hint,
        cross_attention_dim=config.cross_attention_dim,
        unet_config=_unet_config_of(config),
        global_pool=bool(config.global_pool_conditions),
    )
    state = {_from_diffusers_key(k): v for k, v in model.state_dict().items()}
    expected = {k: v.shape for k, v in controlnet.state_dict().items()}
    _check_state_dict("the ControlNetModel's weights, for cnet", state, expected)
    controlnet.load_state_dict(state, strict=True)
    return controlnet.train(model.training)


# --------------------------------------------------------------------------------------------
# cnet <-> official (ldm) layout
# --------------------------------------------------------------------------------------------


def _module_prefixes(controlnet: ControlNet) -> list[tuple[str, str, bool]]:
    """(cnet prefix, official prefix, is_resnet) for every module holding weights."""
    pairs: list[tuple[str, str, bool]] = [
        ("conv_in.", "input_blocks.0.0.", False),
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("zero_convs.", "zero_convs.", False),  # index kept, ".0." added below
        ("mid_zero_conv.", "middle_block_out.0.", False),
    ]
    n = 1  # input_blocks.0 is conv_in
    for level, block in enumerate(controlnet.down_blocks):
        for j in range(len(block.resnets)):
            pairs.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{n}.0.", True))
            if getattr(block, "attentions", None) is not None and j < len(block.attentions):
                pairs.append(
                    (f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{n}.1.", False)
                )
            n += 1
        for j in range(len(block.downsamplers or [])):
            pairs.append(
                (f"down_blocks.{level}.downsamplers.{j}.conv.", f"input_blocks.{n}.0.op.", False)
            )
            n += 1
    mid = controlnet.mid_block
    n_attn = len(getattr(mid, "attentions", None) or [])
    for i in range(len(mid.resnets)):  # ldm interleaves: resnet, attention, resnet, ...
        pairs.append((f"mid_block.resnets.{i}.", f"middle_block.{2 * i if n_attn else i}.", True))
    for i in range(n_attn):
        pairs.append((f"mid_block.attentions.{i}.", f"middle_block.{2 * i + 1}.", False))
    hint = controlnet.hint_encoder
    pairs.append(("hint_encoder.conv_in.", "input_hint_block.0.", False))
    for m in range(len(hint.blocks)):  # a SiLU sits between consecutive convs
        pairs.append((f"hint_encoder.blocks.{m}.", f"input_hint_block.{2 * m + 2}.", False))
    pairs.append(("hint_encoder.conv_out.", f"input_hint_block.{2 * len(hint.blocks) + 2}.", False))
    return pairs


def official_key_map(controlnet: ControlNet) -> dict[str, str]:
    """cnet state-dict key -> official key (without the ``control_model.`` prefix)."""
    if isinstance(controlnet.hint_encoder, PaperHintEncoder):
        raise ValueError(
            "the official checkpoint layout holds the released condition encoder only "
            "(input_hint_block: 3x3 convs, SiLU); this ControlNet uses the paper's encoder"
        )
    prefixes = sorted(_module_prefixes(controlnet), key=lambda p: -len(p[0]))
    mapping = {}
    for key in controlnet.state_dict():
        for ours, theirs, is_resnet in prefixes:
            if key.startswith(ours):
                rest = key[len(ours) :]
                if ours == "zero_convs.":
                    index, param = rest.split(".", 1)
                    rest = f"{index}.0.{param}"
                elif is_resnet:
                    head, param = rest.split(".", 1)
                    rest = f"{_RESNET_TO_LDM.get(head, head)}.{param}"
                mapping[key] = theirs + rest
                break
        else:
            raise ValueError(f"no official name for the ControlNet weight {key!r}")
    return mapping


def to_official_state_dict(
    controlnet: ControlNet, prefix: str = OFFICIAL_PREFIX
) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under official keys (``control_model.input_blocks.0.0.weight``,
    ...), detached and contiguous, ready for safetensors."""
    state = controlnet.state_dict()
    return {
        prefix + theirs: state[ours].detach().contiguous()
        for ours, theirs in official_key_map(controlnet).items()
    }


def _control_model_part(
    state_dict: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    # A full ControlLDM checkpoint holds SD too; keep the control model's keys. A file with no
    # prefixed key at all is taken to be a bare control model.
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def load_official_state_dict(
    controlnet: ControlNet,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = OFFICIAL_PREFIX,
) -> ControlNet:
    """Load official-layout weights into ``controlnet`` (in place; returned for chaining).

    Keys outside ``prefix`` (the SD weights of a full checkpoint) are ignored. Raises a
    ValueError listing missing, unexpected and mis-shaped ``control_model.*`` keys.
    """
    given = _control_model_part(state_dict, prefix)
    to_cnet = {theirs: ours for ours, theirs in official_key_map(controlnet).items()}
    shapes = controlnet.state_dict()
    expected = {theirs: shapes[ours].shape for theirs, ours in to_cnet.items()}
    shown = {k: prefix + k for k in {*given, *expected}}
    _check_state_dict("the official checkpoint", given, expected, shown)
    controlnet.load_state_dict({to_cnet[k]: v for k, v in given.items()}, strict=True)
    return controlnet


def read_official_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a released weights file's tensors (the files lllyasviel/ControlNet ships; a run's own
    training state is :mod:`cnet.checkpoints`): ``.safetensors`` with safetensors, anything else
    (.pth, .ckpt) with ``torch.load(weights_only=True)``; a nested ``state_dict`` entry is
    unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}"
        )
    return dict(state)


def save_official(controlnet: ControlNet, path: str | Path, prefix: str = OFFICIAL_PREFIX) -> Path:
    """Write the official-layout weights to a ``.safetensors`` file (never a pickle)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors path (cnet writes no pickles), got {path}")
    save_file(to_official_state_dict(controlnet, prefix), str(path))
    return path


_HINT_CONV = re.compile(r"^input_hint_block\.(\d+)\.weight$")


def _hint_layout(given: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(condition channels, stage channels) of an official ``input_hint_block``."""
    convs = sorted(
        (int(m.group(1)), v) for k, v in given.items() if (m := _HINT_CONV.match(k)) is not None
    )
    if len(convs) < 2 or len(convs) % 2:
        found = [f"input_hint_block.{i}.weight" for i, _ in convs]
        raise ValueError(
            "the official checkpoint's input_hint_block: expected an even number (>= 2) of conv "
            f"weights input_hint_block.0, .2, ..., .14.weight (8 for SD), found {found}"
        )
    weights = [w for _, w in convs]
    blocks = weights[1:-1]  # pairs: (same channels, stride-2 to the next stage)
    return weights[0].shape[1], (weights[0].shape[0], *(w.shape[0] for w in blocks[1::2]))


def from_official(
    unet: UNet2DConditionModel,
    checkpoint: Mapping[str, torch.Tensor] | str | Path,
    *,
    global_pool: bool = False,
    prefix: str = OFFICIAL_PREFIX,
) -> ControlNet:
    """A ControlNet for ``unet`` with an official checkpoint's weights (state dict or path).
    The condition encoder's condition channels and stage channels come from the checkpoint."""
    state = read_official_weights(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    condition_channels, hint_channels = _hint_layout(_control_model_part(state, prefix))
    controlnet = ControlNet.from_unet(
        unet,
        "released",
        condition_channels=condition_channels,
        hint_channels=hint_channels,
        global_pool=global_pool,
    )
    return load_official_state_dict(controlnet, state, prefix)
