"""What updates the weights: AdamW over the ControlNet (ICCV §3.3, as the released code trains
it) and the learning rate by update, a function of the step alone."""

from __future__ import annotations

import functools
import warnings

import torch

from .config import TrainConfig

__all__ = ["lr_factor", "make_optimizer", "make_schedule", "pretrained_parameters"]

# fp16: an update skipped for overflow is still an update the schedule counts (the rate is a
# function of the step); torch would warn at every such step that the optimizer did not step
warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of update ``step`` as a share of ``config.lr``: 1 until
    ``lr_decay_start`` (0: always 1), then linearly down to ``lr_min_share`` over
    ``lr_decay_steps`` updates, and that floor after. A function of the step alone, so a resumed
    run continues the same schedule and a run continued past its steps trains on at the
    floor."""
    if config.lr_decay_start == 0 or step < config.lr_decay_start:
        return 1.0
    progress = min(1.0, (step - config.lr_decay_start) / config.lr_decay_steps)
    return 1.0 - (1.0 - config.lr_min_share) * progress


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, start: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's ``LambdaLR`` over :func:`lr_factor`, placed at update ``start`` (a resumed run's
    first); stepped once per optimizer step."""
    for group in optimizer.param_groups:  # what LambdaLR scales, set as it would at step 0
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, config), last_epoch=start - 1
    )


def make_optimizer(
    trained: torch.nn.Module, unet, config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    r"""AdamW over what the run trains, as the released ``cldm.py`` (``configure_optimizers``)
    trains a ControlNet; the weights that start from the base's (:func:`pretrained_parameters`)
    at ``copy_lr_scale`` × the rate of those that start from scratch (the condition encoder and
    the zero convolutions); with ``sd_locked`` false, also over the U-Net's decoder at
    ``decoder_lr_scale`` × the rate (its encoder never trains)."""
    trainable = [p for p in trained.parameters() if p.requires_grad]
    if config.copy_lr_scale == 1.0:
        groups = [{"params": trainable, "lr": config.lr}]
    else:  # the pretrained weights slower than the parts that start from scratch
        copy = {id(p) for p in pretrained_parameters(trained, config)}
        groups = [
            {
                "params": [p for p in trainable if id(p) in copy],
                "lr": config.lr * config.copy_lr_scale,
            },
            {"params": [p for p in trainable if id(p) not in copy], "lr": config.lr},
        ]
    if not config.sd_locked:
        decoder = [unet.up_blocks, unet.conv_norm_out, unet.conv_out]
        params = [p for part in decoder if part is not None for p in part.parameters()]
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": config.lr * config.decoder_lr_scale})
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, **fast)


def pretrained_parameters(trained: torch.nn.Module, config: TrainConfig) -> list:
    r"""The weights of what a run trains that start from the base's: a ControlNet's trainable
    copy :math:`\Theta_c` (ControlNet-lite's blocks start from scratch (:mod:`cnet.variants`),
    so of its copy only ``conv_in``); a concatenating U-Net's every weight but ``conv_in``'s,
    which holds the new, zero input channels. The methods that start from scratch (T2I-Adapter,
    ControlNet-XS) take no ``copy_lr_scale`` (:mod:`cnet.train.config`)."""
    if config.method == "concat":
        return [p for name, p in trained.named_parameters() if name != "conv_in.weight"]
    if config.trainable_copy == "lite":
        return list(trained.conv_in.parameters())
    return list(trained.theta_c_parameters())
