r"""Sudden convergence, measured (ICCV §3.3; v1 Fig. 4 shows it as samples).

The paper observes that a ControlNet does not learn to follow its condition gradually: for
thousands of steps its samples ignore the condition, then within a short stretch of training
they start following it ("sudden convergence", at step 6133 in v1 Fig. 4, a set of samples, not
a curve). This module reads a
fidelity curve (condition fidelity against training step) and says where the jump happened and
how abrupt it was.

Definitions, on a lightly smoothed curve :math:`f(t)`:

* baseline :math:`f_0` = median of the first ``edge`` fraction of the evaluations, final level
  :math:`f_1` = median of the last ``edge`` fraction, gain :math:`\Delta = f_1 - f_0`;
* :math:`t_{80}` = first evaluation at which :math:`f \ge f_0 + 0.8\Delta`;
  :math:`t_{20}` = the evaluation after the last one before :math:`t_{80}` with
  :math:`f < f_0 + 0.2\Delta`; the **convergence step** :math:`t_{50}` = first evaluation in
  :math:`[t_{20}, t_{80}]` with :math:`f \ge f_0 + 0.5\Delta`;
* **abruptness** = :math:`(t_{80} - t_{20}) / t_{50}`: the share of the training so far that the
  jump took. A linear ramp from step 0 gives about 1.1, an exponential approach more; a jump
  within a few hundred steps after 6133 steps of waiting, as the paper's samples suggest, would
  be under 0.1. ``sudden`` is ``abruptness <= sudden_below``
  (0.25 by default);
* **sharpest interval**: the sharpest rise between two consecutive evaluations within the jump
  (those ending at :math:`t_{20} \dots t_{80}`), as a share of the gain (``sharpest_share``),
  and the evaluation it ends at (``sharpest_step``). A curve can start following its condition
  abruptly and still take a while to reach its final level: then the sharpest share is large
  while the abruptness is not small. A step function has sharpest share 1, a linear ramp over
  :math:`n` evaluations about :math:`1/n`.

The **onset** of a run (:func:`onset_step`, the ablations' measure of *when*) is read off the raw
curve instead: the first evaluation whose fidelity is above a reference band (the step-0 value,
or the locked base's fidelity on the same conditions, plus ``margin``) and stays above it at the
next evaluation. The evaluation repeats the same conditions and starting noise, so consecutive
evaluations differ only as the weights do: before their onsets, the shipped ablation runs with
zero convolutions (``figures/07_ablations.json``, 20 runs) stayed within 0.05 of their step-0
IoU, and reached it once, a lone evaluation that fell back at the next: why an onset needs two
evaluations in a row above the band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "LOSS_WINDOW",
    "ConvergenceReport",
    "detect_sudden_convergence",
    "fidelity_collapsed",
    "loss_spiked",
    "onset_step",
]


@dataclass(frozen=True)
class ConvergenceReport:
    converged: bool  # the curve gained at least `min_gain` over its baseline
    step: int | None  # t50, the convergence step
    start: int | None  # t20
    end: int | None  # t80
    abruptness: float | None  # (t80 - t20) / t50
    sudden: bool
    baseline: float
    final: float
    sharpest_step: int | None = None  # the evaluation ending the sharpest rise
    sharpest_share: float | None = None  # that rise as a share of the gain (final - baseline)

    def as_dict(self) -> dict:
        return asdict(self)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    # a centred running median: robust to the single noisy evaluations a sampler produces
    if window <= 1:
        return values
    half = window // 2
    padded = np.pad(values, half, mode="edge")
    return np.array([np.median(padded[i : i + window]) for i in range(len(values))])


def detect_sudden_convergence(
    steps: Sequence[int],
    fidelity: Sequence[float],
    min_gain: float = 0.05,
    edge: float = 0.1,
    window: int = 3,
    sudden_below: float = 0.25,
) -> ConvergenceReport:
    """Find the convergence step of a fidelity curve and how abrupt the jump was (see the
    module docstring for the definitions). ``steps`` must increase strictly; at least 5
    evaluations are needed."""
    t = np.asarray(steps, dtype=np.int64)
    f = np.asarray(fidelity, dtype=np.float64)
    if t.ndim != 1 or t.shape != f.shape or len(t) < 5:
        raise ValueError(
            f"expected two 1-D sequences of the same length >= 5, got {t.shape} and {f.shape}"
        )
    if np.any(np.diff(t) <= 0):
        raise ValueError("expected strictly increasing steps")
    if not np.all(np.isfinite(f)):
        raise ValueError("expected finite fidelity values")
    smooth = _smooth(f, window)
    k = max(1, int(round(edge * len(f))))
    baseline, final = float(np.median(smooth[:k])), float(np.median(smooth[-k:]))
    gain = final - baseline
    if gain < min_gain:
        return ConvergenceReport(False, None, None, None, None, False, baseline, final)

    def level(q: float) -> float:
        return baseline + q * gain

    i80 = int(np.argmax(smooth >= level(0.8)))
    below20 = np.nonzero(smooth[:i80] < level(0.2))[0]
    i20 = int(below20[-1]) + 1 if len(below20) else 0
    i50 = i20 + int(np.argmax(smooth[i20 : i80 + 1] >= level(0.5)))
    step50 = int(t[i50])
    abruptness = float(t[i80] - t[i20]) / max(step50, 1)
    # the sharpest rise within the jump (the intervals ending at t20 ... t80): elsewhere a noise
    # bump on a slow curve could win
    rises = np.diff(smooth)
    first = max(i20 - 1, 0)
    sharpest = first + int(np.argmax(rises[first : max(i80, first + 1)]))
    return ConvergenceReport(
        True,
        step50,
        int(t[i20]),
        int(t[i80]),
        abruptness,
        abruptness <= sudden_below,
        baseline,
        final,
        sharpest_step=int(t[sharpest + 1]),
        sharpest_share=float(rises[sharpest] / gain),
    )


def onset_step(
    steps: Sequence[int],
    fidelity: Sequence[float],
    margin: float = 0.05,
    reference: float | None = None,
) -> int | None:
    """The first evaluation step whose fidelity exceeds ``reference`` (default: the step-0
    value) by more than ``margin`` at that evaluation and the next (None if no such step);
    ``steps[0]`` must be the step-0 evaluation."""
    if not steps or steps[0] != 0:
        raise ValueError("expected the curve to start with its step-0 evaluation")
    band = (fidelity[0] if reference is None else reference) + margin
    for i in range(1, len(steps) - 1):
        if fidelity[i] > band and fidelity[i + 1] > band:
            return int(steps[i])
    return None


def fidelity_collapsed(fidelity: Sequence[float], margin: float = 0.05) -> bool:
    """A run that learned to follow its condition and then lost it: its best fidelity rose more
    than ``2 * margin`` above the first evaluation's (step 0: the locked base's, exactly, with
    zero convolutions), and the latest has fallen back below half of that gain. The shipped
    ablation runs that collapsed fell from the base's level to far below it, and a run that
    learned and then lost it falls back through it: both are caught."""
    if len(fidelity) < 2:
        return False
    base, best = fidelity[0], max(fidelity)
    return best - base > 2 * margin and fidelity[-1] < base + (best - base) / 2


#: How many logged losses :func:`loss_spiked` averages (and how many windows of history it needs).
LOSS_WINDOW = 25


def loss_spiked(loss: Sequence[float], window: int = LOSS_WINDOW, factor: float = 2.0) -> bool:
    """The mean loss of the last ``window`` logged steps is above ``factor`` × the mean of every
    step logged before them (at least three windows of them). A run that collapsed in the
    shipped ablations went from its working ε-loss (about 0.08) to about 1, the variance of the
    noise: a model that predicts nothing of it."""
    if len(loss) < 4 * window:
        return False
    recent = float(np.mean(loss[-window:]))
    return recent > factor * float(np.mean(loss[:-window]))
