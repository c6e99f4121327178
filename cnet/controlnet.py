r"""ControlNet on a whole Stable Diffusion U-Net: the paper's ICCV §3.2, over diffusers.

Stable Diffusion's U-Net has an encoder of 12 blocks at 4 resolutions, a middle block, and a
decoder whose 12 blocks each take one *skip connection* from the encoder. ControlNet applies
Eq. 2 to the encoder and middle block as a whole:

* a **trainable copy** :math:`\Theta_c` of ``conv_in``, the time embedding, every down block
  and the mid block (bitwise copies of the locked U-Net's weights, :func:`cnet.trainable_copy`);
* the **condition encoder** :math:`\mathcal{E}` (Eq. 9, :mod:`cnet.hint`) whose zero-initialised
  output is added after the copy's ``conv_in``: :math:`x + Z(c_f; \Theta_{z1})`;
* **12 + 1 zero convolutions** :math:`Z(\cdot; \Theta_{z2})`, one per skip feature of the copy
  (after ``conv_in``, after each layer of each level, after each downsampler) and one for the
  middle block. Their outputs, the *residuals* :math:`r_0 \dots r_{11}, r_{12}`, are added to
  the locked decoder's skip connections and to the locked middle block's output:

.. math:: \text{skip}_i \leftarrow \text{skip}_i + s_i\, r_i \quad (i < 12), \qquad
          \text{mid} \leftarrow \text{mid} + s_{12}\, r_{12}

with control scales :math:`s_i` (1 by default). The number of residuals follows the U-Net's
config (1 + levels × layers + downsamplers, + 1 for the middle); 12 + 1 is SD's. All zero
convolutions start at 0, so at initialisation the controlled U-Net's output equals the plain
U-Net's bit for bit (Eq. 4 for the whole network).

diffusers is the engine: the copied blocks are diffusers' own (``get_down_block``,
``UNetMidBlock2DCrossAttn``, ``TimestepEmbedding``, ``Timesteps``), and the injection is the
locked U-Net's own forward with ``down_block_additional_residuals`` and
``mid_block_additional_residual`` (:mod:`cnet.injection`). :class:`ControlNet` mirrors diffusers'
``ControlNetModel``; :mod:`cnet.convert` moves weights between the two and the official files.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .block import trainable_copy
from .hint import (
    EncodedCondition,
    HintEncoderKind,
    PaperHintEncoder,
    ReleasedHintEncoder,
    downscale_factor_for,
    make_hint_encoder,
)
from .residuals import ControlResiduals, GuessRule, control_scales
from .zero_conv import ZeroConv2d

__all__ = [
    "ControlNet",
    "check_mirrorable",
    "unet_residual_names",
    "unet_skip_channels",
]


MIRRORED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
MIRRORED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# Config entries that change the encoder path in ways the trainable copy does not reproduce
# (extra embeddings, input centring): value cnet needs.
_UNMIRRORED_SETTINGS: dict[str, Any] = {
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_type": "positional",
}
# --------------------------------------------------------------------------------------------
# Which U-Nets cnet can mirror, and where their skip connections are
# --------------------------------------------------------------------------------------------


def check_mirrorable(unet: UNet2DConditionModel) -> None:
    """Raise a ValueError listing every setting of ``unet`` that a ControlNet cannot mirror.

    cnet copies the encoder path ``conv_in → time embedding → down blocks → mid block`` of a
    ``UNet2DConditionModel`` whose down blocks are ``CrossAttnDownBlock2D`` / ``DownBlock2D``
    and whose mid block is ``UNetMidBlock2DCrossAttn`` / ``UNetMidBlock2D``, with only the
    timestep embedding (no class, addition or image embeddings): SD 1.x and 2.x.
    """
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    config = unet.config
    problems = [
        f"{key}={config.get(key)!r} (expected {needed!r})"
        for key, needed in _UNMIRRORED_SETTINGS.items()
        if config.get(key, needed) != needed
    ]
    for i, kind in enumerate(config.down_block_types):
        if kind not in MIRRORED_DOWN_BLOCKS:
            problems.append(
                f"down_block_types[{i}]={kind!r} (expected one of {MIRRORED_DOWN_BLOCKS})"
            )
    if config.mid_block_type not in MIRRORED_MID_BLOCKS:
        problems.append(
            f"mid_block_type={config.mid_block_type!r} (expected one of {MIRRORED_MID_BLOCKS}: "
            "the 13th residual needs a middle block)"
        )
    if problems:
        raise ValueError("cnet cannot mirror this UNet2DConditionModel: " + "; ".join(problems))


def _skip_channels(conv_in: nn.Conv2d, down_blocks: Sequence[nn.Module]) -> list[int]:
    # The order the U-Net stacks its skip features: conv_in, each resnet (each "layer"), each
    # downsampler. This is also the order of diffusers' down_block_res_samples.
    channels = [conv_in.out_channels]
    for block in down_blocks:
        channels += [resnet.out_channels for resnet in block.resnets]
        channels += [down.out_channels for down in (block.downsamplers or [])]
    return channels


def _skip_names(down_blocks: Sequence[nn.Module]) -> list[str]:
    # Where each skip feature is taken, by module name, in the same order.
    names = ["conv_in"]
    for level, block in enumerate(down_blocks):
        names += [f"down_blocks.{level}.resnets.{j}" for j in range(len(block.resnets))]
        names += [
            f"down_blocks.{level}.downsamplers.{j}" for j in range(len(block.downsamplers or []))
        ]
    return names


def unet_skip_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of the U-Net's skip connections, in encoder order: 12 entries for SD
    (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280 for SD1.5)."""
    return _skip_channels(unet.conv_in, unet.down_blocks)


def unet_residual_names(unet: UNet2DConditionModel) -> list[str]:
    """Where each of the U-Net's 12 + 1 features is taken, by diffusers' module name: ``conv_in``,
    ``down_blocks.L.resnets.J``, ``down_blocks.L.downsamplers.0``, ..., ``mid_block``."""
    return [*_skip_names(unet.down_blocks), "mid_block"]


# --------------------------------------------------------------------------------------------
# The ControlNet
# --------------------------------------------------------------------------------------------


def _condition_size_error(expected: str, condition: torch.Tensor) -> ValueError:
    return ValueError(f"condition: expected shape {expected}, got {tuple(condition.shape)}")


class ControlNet(nn.Module):
    r"""A ControlNet for a diffusers ``UNet2DConditionModel`` (ICCV §3.2): 12 + 1 residuals.

    Build it with :meth:`from_unet` (trainable copy of a locked U-Net); :mod:`cnet.convert`
    builds one from a diffusers ``ControlNetModel`` or an lllyasviel checkpoint, and back.

    Parts, named after the paper:

    * ``conv_in``, ``time_proj``, ``time_embedding``, ``down_blocks``, ``mid_block``: the
      trainable copy :math:`\Theta_c`, diffusers modules under the U-Net's own names;
    * ``hint_encoder``: :math:`\mathcal{E}` of Eq. 9 ending in its zero convolution;
    * ``zero_convs``: one :class:`~cnet.ZeroConv2d` per skip connection (12 for SD), and
      ``mid_zero_conv`` for the middle block: the :math:`Z(\cdot; \Theta_{z2})` of Eq. 2.

    ``unet_config`` is the configuration of the U-Net the copy mirrors (a plain dict), so that
    the network can be described to diffusers or rebuilt without that U-Net at hand.
    """

    def __init__(
        self,
        *,
        conv_in: nn.Conv2d,
        time_proj: nn.Module,
        time_embedding: nn.Module,
        down_blocks: nn.ModuleList,
        mid_block: nn.Module,
        hint_encoder: ReleasedHintEncoder | PaperHintEncoder,
        cross_attention_dim: int | None,
        unet_config: dict[str, Any],
        global_pool: bool = False,
    ):
        super().__init__()
        self.conv_in = conv_in
        self.time_proj = time_proj
        self.time_embedding = time_embedding
        self.down_blocks = down_blocks
        self.mid_block = mid_block
        self.hint_encoder = hint_encoder
        skip_channels = _skip_channels(conv_in, down_blocks)
        self.zero_convs = nn.ModuleList([ZeroConv2d(c) for c in skip_channels])
        mid_channels = mid_block.resnets[-1].out_channels
        self.mid_zero_conv = ZeroConv2d(mid_channels)
        if hint_encoder.out_channels != conv_in.out_channels:
            raise ValueError(
                f"condition encoder: expected {conv_in.out_channels} output channels (conv_in's), "
                f"got {hint_encoder.out_channels}"
            )
        device = conv_in.weight.device
        self.zero_convs.to(device=device, dtype=conv_in.weight.dtype)
        self.mid_zero_conv.to(device=device, dtype=conv_in.weight.dtype)
        self.in_channels = conv_in.in_channels
        self.cross_attention_dim = cross_attention_dim
        self.global_pool = global_pool
        self.skip_channels = tuple(skip_channels)
        self.mid_channels = mid_channels
        self.unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        hint_encoder: HintEncoderKind = "released",
        *,
        condition_channels: int = 3,
        condition_size: int | tuple[int, int] | None = None,
        hint_channels: Sequence[int] | None = None,
        global_pool: bool = False,
    ) -> ControlNet:
        r"""Clone the encoder and middle block of ``unet`` into a ControlNet (ICCV §3.2).

        ``conv_in``, the time embedding, every down block and the mid block are deep copies
        (:func:`cnet.trainable_copy`): equal to the U-Net's weights bit for bit, trainable, no
        shared storage. ``unet`` itself is left untouched (lock it, or use
        :class:`ControlledUNet`, which does).

        ``hint_encoder`` picks :math:`\mathcal{E}` (Eq. 9): ``"released"`` or ``"paper"``.
        ``condition_size`` is the condition image's size in pixels; with the U-Net's
        ``sample_size`` it fixes E's downsampling factor. Default: 8 × ``sample_size``
        (SD's VAE ratio: 512-pixel conditions for 64×64 latents), or, for the released encoder
        given ``hint_channels``, one halving per stage after the first. ``hint_channels``
        overrides E's stage channels. ``global_pool`` averages each residual over H, W
        (ControlNet 1.1 shuffle).
        """
        check_mirrorable(unet)
        if condition_size is None and hint_encoder == "released" and hint_channels is not None:
            factor = 2 ** (len(hint_channels) - 1)  # one halving per stage after the first
        elif condition_size is None:
            factor = 8
        else:
            if unet.config.sample_size is None:
                raise ValueError(
                    "condition_size needs the U-Net's sample_size, and unet.config.sample_size "
                    "is None: pass condition_size=None (factor 8) or set sample_size"
                )
            factor = downscale_factor_for(unet.config.sample_size, condition_size)
        weight = unet.conv_in.weight
        hint = make_hint_encoder(
            hint_encoder,
            out_channels=unet.conv_in.out_channels,
            condition_channels=condition_channels,
            downscale_factor=factor,
            channels=hint_channels,
        ).to(device=weight.device, dtype=weight.dtype)
        return cls(
            conv_in=trainable_copy(unet.conv_in),
            time_proj=trainable_copy(unet.time_proj),
            time_embedding=trainable_copy(unet.time_embedding),
            down_blocks=trainable_copy(unet.down_blocks),
            mid_block=trainable_copy(unet.mid_block),
            hint_encoder=hint,
            cross_attention_dim=unet.config.cross_attention_dim,
            unet_config=dict(unet.config),
            global_pool=global_pool,
        )

    @torch.no_grad()
    def transferred(
        self, base: UNet2DConditionModel, fine_tune: UNet2DConditionModel
    ) -> ControlNet:
        r"""A copy of this ControlNet moved from the ``base`` it was trained on to a ``fine_tune``
        of that base, by the released code's rule (``tool_transfer_control.py``): every weight
        the copy took from the U-Net gets the fine-tune's change added,

        .. math:: \Theta_c' = \Theta_c + (\Theta_{\text{fine-tune}} - \Theta_{\text{base}}),

        while the condition encoder and the zero convolutions, which the U-Net does not have,
        stay as they are. The paper's own claim is the simpler one: the ControlNet works on the
        fine-tune unchanged. ``self`` is left as it is."""
        base_weights, tuned_weights = base.state_dict(), fine_tune.state_dict()
        moved = copy.deepcopy(self)
        for name, weight in moved.state_dict().items():
            if name not in base_weights:
                continue  # the condition encoder and the zero convolutions
            for role, weights in (("base", base_weights), ("fine_tune", tuned_weights)):
                if name not in weights or weights[name].shape != weight.shape:
                    raise ValueError(
                        f"{role}: not the U-Net this ControlNet was copied from "
                        f"({name} is {tuple(weight.shape)} in the ControlNet)"
                    )
            weight += (tuned_weights[name] - base_weights[name]).to(weight)
        return moved

    # ---- sizes -----------------------------------------------------------------------------

    @property
    def n_residuals(self) -> int:
        """12 + 1 for SD: one per skip connection, one for the middle block."""
        return len(self.zero_convs) + 1

    @property
    def downscale_factor(self) -> int:
        """Condition pixels per latent pixel (8 for SD)."""
        return self.hint_encoder.downscale_factor

    @property
    def condition_channels(self) -> int:
        return self.hint_encoder.condition_channels

    def residual_names(self) -> list[str]:
        """Where each residual is taken, by module: ``conv_in``, ``down_blocks.L.resnets.J``,
        ``down_blocks.L.downsamplers.0``, ..., ``mid_block`` (diffusers' names)."""
        return [*_skip_names(self.down_blocks), "mid_block"]

    # ---- the paper's parameter groups ------------------------------------------------------

    @property
    def zero_convolutions(self) -> dict[str, nn.Conv2d]:
        r"""Every zero-initialised convolution, by the name the training log uses:
        ``zero_conv.0`` … ``zero_conv.11`` and ``zero_conv.mid`` (the :math:`\Theta_{z2}` of the
        12 + 1 residuals), and ``zero_conv.hint``, the condition encoder's last layer
        (:math:`\Theta_{z1}`, through which the condition enters the copy)."""
        convs: dict[str, nn.Conv2d] = {f"zero_conv.{i}": z for i, z in enumerate(self.zero_convs)}
        convs["zero_conv.mid"] = self.mid_zero_conv
        convs["zero_conv.hint"] = self.hint_encoder.zero_conv
        return convs

    def theta_c_parameters(self) -> list[nn.Parameter]:
        r""":math:`\Theta_c`: the parameters of the trainable copy (conv_in, time embedding, down
        blocks, mid block), without the condition encoder and the zero convolutions."""
        parts = (self.conv_in, self.time_embedding, self.down_blocks, self.mid_block)
        return [p for part in parts for p in part.parameters()]

    # ---- forward ---------------------------------------------------------------------------

    def _check_inputs(
        self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, condition: torch.Tensor
    ) -> None:
        if sample.dim() != 4 or sample.shape[1] != self.in_channels:
            raise ValueError(
                f"sample: expected shape (N, {self.in_channels}, h, w), got {tuple(sample.shape)}"
            )
        n, _, h, w = sample.shape
        f, c = self.downscale_factor, self.condition_channels
        expected = f"({n}, {c}, {f * h}, {f * w}) ({f}x the latent's {h}x{w}, in [0, 1])"
        if isinstance(condition, EncodedCondition):
            if condition.encoder != id(self.hint_encoder):
                raise ValueError("condition: encoded by another ControlNet's condition encoder")
            shape, condition = (n, self.conv_in.out_channels, h, w), condition.features
            if tuple(condition.shape) != shape:
                raise _condition_size_error(f"{shape}, encoded", condition)
        elif condition.dim() != 4 or tuple(condition.shape) != (n, c, f * h, f * w):
            raise _condition_size_error(expected, condition)
        dim = self.cross_attention_dim
        if isinstance(dim, int) and (
            encoder_hidden_states.dim() != 3
            or encoder_hidden_states.shape[0] != n
            or encoder_hidden_states.shape[2] != dim
        ):
            raise ValueError(
                f"encoder_hidden_states: expected shape ({n}, L, {dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )

    def embed_time(
        self, timestep: torch.Tensor | float | int, sample: torch.Tensor
    ) -> torch.Tensor:
        """The time embedding of the trainable copy, one row per sample (as the U-Net does)."""
        n = sample.shape[0]
        if not torch.is_tensor(timestep):
            is_float = isinstance(timestep, float)
            dtype = torch.float64 if is_float else torch.int64
            if sample.device.type == "mps" and is_float:
                dtype = torch.float32
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(sample.device)
        if timestep.dim() != 1 or timestep.shape[0] not in (1, n):
            raise ValueError(
                f"timestep: expected a number or a tensor of shape () / (1,) / ({n},), "
                f"got shape {tuple(timestep.shape)}"
            )
        t_emb = self.time_proj(timestep.expand(n)).to(dtype=sample.dtype)
        return self.time_embedding(t_emb)

    def encode_condition(self, condition: torch.Tensor | EncodedCondition) -> EncodedCondition:
        r""":math:`Z(\mathcal{E}(c_i); \Theta_{z1})` (Eq. 9 and Eq. 2's inner zero convolution),
        which :meth:`forward` also accepts in place of the images: encode once, sample many."""
        if isinstance(condition, EncodedCondition):
            return condition
        return EncodedCondition(self.hint_encoder(condition), id(self.hint_encoder))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor | EncodedCondition,
    ) -> ControlResiduals:
        r"""The 12 + 1 residuals (unscaled) for a noisy latent, a timestep, a text embedding
        and a condition image in [0, 1] of ``downscale_factor`` × the latent's size.

        ``sample`` (N, C, h, w), ``timestep`` a number or (N,), ``encoder_hidden_states``
        (N, L, cross_attention_dim), ``condition`` (N, 3, 8h, 8w) for SD, or its
        :meth:`encode_condition`.
        """
        self._check_inputs(sample, encoder_hidden_states, condition)
        emb = self.embed_time(timestep, sample)
        # x + Z(c_f; Θ_z1) with c_f = E(c_i), Eq. 9: the condition enters after conv_in.
        h = self.conv_in(sample) + self.encode_condition(condition).features
        features = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, skips = block(
                    hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states
                )
            else:
                h, skips = block(hidden_states=h, temb=emb)
            features.extend(skips)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = self.mid_block(h, emb)
        # Z(·; Θ_z2), one per skip feature and one for the middle block.
        down = tuple(z(f) for z, f in zip(self.zero_convs, features, strict=True))
        return ControlResiduals(down=down, mid=self.mid_zero_conv(h))

    def residuals(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor | EncodedCondition,
        scale: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        guess_rule: GuessRule = "released",
    ) -> ControlResiduals:
        r"""The residuals as the locked U-Net receives them: scaled by :func:`control_scales`,
        then globally average-pooled if ``global_pool`` (the order of the released code;
        diffusers drops the guess-mode ramp when pooling)."""
        raw = self(sample, timestep, encoder_hidden_states, condition)
        heights = [r.shape[-2] for r in raw.tensors()]
        out = raw.scaled(control_scales(self.n_residuals, scale, guess_mode, guess_rule, heights))
        return out.pooled() if self.global_pool else out
