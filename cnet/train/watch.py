"""A run watched as it trains: the best evaluation's weights kept beside the latest checkpoint,
and a collapse reported the moment it shows (fidelity fallen back toward the locked base's
after it rose, or the loss well above its running level: :mod:`cnet.train.convergence`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import BEST_WEIGHTS, checkpoint_metadata, save_weights
from .convergence import LOSS_WINDOW, fidelity_collapsed, loss_spiked

__all__ = ["RunWatch"]


@dataclass
class RunWatch:
    """What the main process knows of a run's course: every evaluation's ``metric`` (the first
    is step 0's, the locked base's), the losses logged by this invocation, the best evaluation
    (whose weights are ``out/best.safetensors``) and the alerts already given."""

    out: Path
    metric: str = "iou"  # exact IoU in the world, edge F1 on a folder's pairs
    fidelity: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best: float = float("-inf")
    alerts: set[str] = field(default_factory=set)

    @property
    def best_path(self) -> Path:
        return self.out / BEST_WEIGHTS

    def restore(self, start: int) -> None:
        """A resumed run's evaluations, logged losses and alerts so far (from its log, already
        cut back to the checkpoint) and its best weights' value; a new run starts with none.
        Best weights saved after the checkpoint (a crash between the two) are dropped, and the
        next evaluation that beats every earlier one writes them again."""
        if start == 0:
            self.best_path.unlink(missing_ok=True)
            return
        entries = [json.loads(line) for line in (self.out / "log.jsonl").read_text().splitlines()]
        self.fidelity = [
            e["eval"][self.metric] for e in entries if "eval" in e and self.metric in e["eval"]
        ]
        self.losses = [e["loss"] for e in entries if "loss" in e]
        self.alerts = {e["kind"] for e in entries if "alert" in e}
        self.best = max(self.fidelity, default=float("-inf"))
        if self.best_path.exists():
            metadata = checkpoint_metadata(self.best_path)
            if int(metadata["step"]) <= start:
                self.best = float(json.loads(metadata["metrics"])[self.metric])
            else:
                self.best_path.unlink()

    def evaluated(
        self, step: int, metrics: Mapping[str, float], trainable: Mapping[str, torch.nn.Module]
    ) -> None:
        """Record an evaluation; where it is the best so far, its weights become
        ``best.safetensors`` (written atomically)."""
        value = metrics.get(self.metric)
        if value is None:
            return
        self.fidelity.append(value)
        if value > self.best:
            self.best = value
            save_weights(self.best_path, trainable, step, {self.metric: value})

    def check(self, step: int) -> list[tuple[str, str]]:
        """``(kind, line)`` for each way the run is failing, the first time it shows (kinds:
        ``collapse``, ``loss``)."""
        found = []
        if "collapse" not in self.alerts and fidelity_collapsed(self.fidelity):
            f = self.fidelity
            found.append(
                (
                    "collapse",
                    f"collapse at step {step}: {self.metric} {f[-1]:.3f}, down "
                    f"from its best {max(f):.3f} toward the locked base's {f[0]:.3f}; "
                    f"the best weights are kept in {self.best_path}",
                )
            )
        if "loss" not in self.alerts and loss_spiked(self.losses, LOSS_WINDOW):
            recent, earlier = self.losses[-LOSS_WINDOW:], self.losses[:-LOSS_WINDOW]
            found.append(
                (
                    "loss",
                    f"loss spike at step {step}: the last {len(recent)} logged "
                    f"losses average {sum(recent) / len(recent):.3f}, over twice the "
                    f"earlier {sum(earlier) / len(earlier):.3f}; the best weights are "
                    f"kept in {self.best_path}",
                )
            )
        self.alerts |= {kind for kind, _ in found}
        return found
