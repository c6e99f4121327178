"""Training a ControlNet on a locked Stable Diffusion base (ICCV §3.3).

=============  ============================================================================
module         what it holds
=============  ============================================================================
config         :class:`TrainConfig` and its profiles (settings checked: :mod:`cnet.settings`)
models         the locked base a run controls and the ControlNet it trains
data           the task's data cached once, each step's batch
engine         accelerate: device, mixed precision, processes, gradient checkpointing
folders        pairs from a folder (the tutorial's prompt.json, diffusers' metadata.jsonl)
norms          what a logged step records: the zero convs' and the copy's norms
optim          AdamW over the ControlNet, and the learning rate by step
loss           the training objective: the base's diffusion loss, with control
loop           the run: :class:`Trainer` (one step, an evaluation, a checkpoint) and :func:`train`
watch          a run's best weights and its collapse alerts
runs           resume, reading a run's log, shipping a run (checkpoints: :mod:`cnet.checkpoints`)
evaluation     sampling an evaluation set and measuring it (fidelity: :mod:`cnet.world.metrics`)
convergence    where a fidelity curve jumps, how suddenly, and when a run collapses
=============  ============================================================================
"""

from .config import PROFILES, TASKS, SettingError, TrainConfig
from .convergence import ConvergenceReport, detect_sudden_convergence
from .data import CachedData, cache_data, draw_batch, task_dataset
from .evaluation import evaluate, fidelity, sampler_settings
from .loop import Trainer, TrainingDiverged, train
from .loss import diffusion_loss
from .models import build_controlnet, load_base
from .norms import zero_conv_norms
from .runs import TrainingLog, export_run, load_checkpoint, load_controlnet, read_log

__all__ = [
    "PROFILES",
    "TASKS",
    "CachedData",
    "ConvergenceReport",
    "SettingError",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingLog",
    "build_controlnet",
    "cache_data",
    "detect_sudden_convergence",
    "diffusion_loss",
    "draw_batch",
    "evaluate",
    "export_run",
    "fidelity",
    "load_base",
    "load_checkpoint",
    "load_controlnet",
    "read_log",
    "sampler_settings",
    "task_dataset",
    "train",
    "zero_conv_norms",
]
