"""accelerate's view of this process, shared by everything that trains: the world's base
(:mod:`cnet.world.pretrain`) and the ControlNets (:mod:`cnet.train.engine`) run on the same
engine, and a run of either starts from a fresh accelerate state.
"""

from __future__ import annotations

import datetime
import os

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState

__all__ = ["BARRIER_TIMEOUT", "fresh_accelerator", "launched", "process_state"]

# How long a process waits for the others at a barrier: the main process alone caches a
# folder's latents while the rest wait, which on a large data set takes far longer than the
# process group's default (10 minutes on NCCL).
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def launched() -> bool:
    """Started by torchrun or ``accelerate launch`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(cpu: bool) -> PartialState:
    """accelerate's view of this process (its rank, its device), the process group set up with
    :data:`BARRIER_TIMEOUT`."""
    return PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT) if launched() else PartialState(cpu=cpu)


def fresh_accelerator(**settings) -> Accelerator:
    """``Accelerator(**settings)`` for a run of this process. One process may train several
    runs one after another (a notebook, the tests, pretraining then fine-tuning), each with its
    own device and precision, while accelerate keeps one state per process and refuses a
    second one that differs; so a single process starts from a fresh state: the process's, the
    accelerator's and the gradient state's (a run stopped between micro-batches leaves the
    next one's updates switched off otherwise). accelerate has no public way to do that: these
    ``_reset_state`` calls are what its own tests use."""
    if not launched():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    process_state(settings.get("cpu", False))
    return Accelerator(**settings)
