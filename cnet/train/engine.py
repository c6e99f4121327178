"""accelerate as the training engine: where a run computes, in which precision, in how many
processes, and each process's share of a step's batch.

One process or many, the loop is the same (:mod:`cnet.train.loop`):

    python -m cnet train ...                                           # one process
    torchrun --standalone --nproc_per_node 2 -m cnet train --device cpu ...  # 2 CPU (gloo)
    accelerate launch --multi_gpu --num_processes 2 -m cnet train ...        # 2 GPUs (NCCL)

(``accelerate launch --cpu`` starts several CPU processes only through MPI; torchrun sets the
same environment that accelerate reads, so the first line is how cnet runs several CPU
processes.)

* **Precision** (``mixed_precision``): ``no`` (fp32), ``bf16`` (autocast to bfloat16), ``fp16``
  (autocast to float16 with loss scaling: a GradScaler multiplies the loss before backward so
  that small gradients do not underflow in float16, unscales them before the update and skips
  the update where they overflowed), or ``auto``: bf16 on a GPU that computes bfloat16 natively
  (Ampere and later), fp16 on one that does not (a T4, Colab's free GPU), fp32 on the CPU.
  accelerate runs fp16 on GPUs only; on a CPU it is refused here rather than silently run in
  fp32.
* **Data parallelism.** Every process draws step ``k``'s whole micro-batch from the same
  ``(seed, k)`` generator (:func:`cnet.train.data.draw_batch`) and keeps its own contiguous
  slice (:func:`process_share`). accelerate's DistributedDataParallel averages the slices'
  gradients, which is the gradient of the whole micro-batch: a 2-process run equals the
  1-process run of the same global batch up to float rounding, and resume stays exact.
* **Gradient checkpointing** of the trainable copy (:func:`checkpoint_trainable_copy`): its
  blocks keep no activations for backward and recompute them, trading time for memory.
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from accelerate import Accelerator

from ..controlnet import ControlNet
from ..processes import fresh_accelerator, launched, process_state
from .config import PRECISIONS, SettingError, TrainConfig, resolve_device

__all__ = [
    "PRECISIONS",
    "checkpoint_trainable_copy",
    "make_accelerator",
    "process_share",
    "resolve_precision",
]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``: bf16 where the GPU has it natively, fp16 (with
    loss scaling) on an older GPU, no mixed precision on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "no"
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 reports native support only
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's :class:`accelerate.Accelerator`: its device, precision, gradient accumulation
    and, under torchrun or ``accelerate launch``, its process group."""
    distributed = launched()
    if distributed:
        device = process_state(config.device == "cpu").device
    else:
        device = resolve_device(config.device)
    precision = resolve_precision(config.mixed_precision, device)
    if precision == "fp16" and device.type == "cpu":
        raise SettingError(
            "mixed_precision: 'fp16' is not allowed on the CPU; expected no or "
            "bf16 there (fp16 with loss scaling needs a GPU)"
        )
    accelerator = fresh_accelerator(
        mixed_precision=precision,
        cpu=device.type == "cpu",
        gradient_accumulation_steps=config.grad_accum,
    )
    if accelerator.device != device and not distributed:
        raise SettingError(
            f"device: {config.device!r} is not allowed here; accelerate places "
            f"this run on {accelerator.device} (use auto, cpu or cuda)"
        )
    if config.batch_size % accelerator.num_processes:
        raise SettingError(
            f"batch_size: {config.batch_size} is not allowed with "
            f"{accelerator.num_processes} processes; expected a multiple of "
            f"{accelerator.num_processes} (each process takes an equal share)"
        )
    return accelerator


def process_share(batch: dict, accelerator: Accelerator) -> dict:
    """This process's contiguous slice of a micro-batch every process drew alike (accelerate's
    ``split_between_processes``; the batch size is a multiple of the processes), on its
    device."""
    # a copy: accelerate slices a dictionary's values in place
    with accelerator.split_between_processes(dict(batch)) as share:
        return {k: v.to(accelerator.device) for k, v in share.items()}


def checkpoint_trainable_copy(controlnet: ControlNet) -> int:
    """Switch on diffusers' own gradient checkpointing in every block of the trainable copy
    that supports it (the blocks' ``gradient_checkpointing`` switch, as
    ``ModelMixin.enable_gradient_checkpointing`` sets it); returns how many blocks."""
    recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    blocks = [
        m
        for part in (controlnet.down_blocks, controlnet.mid_block)
        for m in part.modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    for block in blocks:
        # diffusers switches it on only through a ModelMixin's enable_gradient_checkpointing,
        # which the copy (a ControlNet of cnet, not a ModelMixin) has not: the blocks' own
        # attributes are set as that method sets them
        block._gradient_checkpointing_func = lambda module, *args, f=recompute: f(
            module.__call__, *args
        )
        block.gradient_checkpointing = True
    return len(blocks)
