"""The sudden-convergence detector on synthetic fidelity curves with known answers."""

import numpy as np
import pytest

from cnet.train.convergence import detect_sudden_convergence

STEPS = np.arange(0, 10_001, 100)


def _noisy(curve, seed, scale=0.01):
    return curve + np.random.default_rng(seed).normal(0, scale, curve.shape)


@pytest.mark.parametrize("seed", range(5))
def test_a_logistic_jump_like_fig4_is_sudden_at_the_right_step(seed):
    # chance-level IoU 0.12, then a jump to 0.85 centred at step 6133 over ~300 steps
    curve = 0.12 + 0.73 / (1 + np.exp(-(STEPS - 6133) / 70))
    report = detect_sudden_convergence(STEPS, _noisy(curve, seed))
    assert report.converged and report.sudden
    assert abs(report.step - 6133) <= 200
    assert report.start < report.step < report.end
    assert report.abruptness < 0.1
    assert abs(report.baseline - 0.12) < 0.02 and abs(report.final - 0.85) < 0.02


def test_a_perfect_step_function_has_one_evaluation_of_width():
    curve = np.where(STEPS >= 4000, 0.9, 0.1)
    report = detect_sudden_convergence(STEPS, curve)
    assert (report.start, report.step, report.end) == (4000, 4000, 4000)
    assert report.abruptness == 0.0 and report.sudden
    assert report.sharpest_step == 4000 and report.sharpest_share == pytest.approx(1.0)


@pytest.mark.parametrize(
    "curve, expected",
    [
        (0.1 + 0.8 * STEPS / STEPS[-1], 1.09),  # linear ramp, edges taken as levels
        (0.1 + 0.8 * (1 - np.exp(-STEPS / 2000)), None),  # exponential approach
    ],
    ids=["linear", "exponential"],
)
def test_gradual_curves_are_not_sudden(curve, expected):
    report = detect_sudden_convergence(STEPS, curve)
    assert report.converged and not report.sudden
    assert report.abruptness > 1.0
    if expected is not None:
        assert report.abruptness == pytest.approx(expected, rel=0.05)
        # 100 equal rises, measured against the gain between the edge medians (0.9 of the ramp)
        assert report.sharpest_share == pytest.approx(1 / 90, rel=0.05)


def test_an_abrupt_rise_followed_by_a_slow_climb_is_told_apart_from_both():
    # flat at 0.3, a jump of half the gain in one evaluation at step 3000, then a linear climb
    climb = np.clip((STEPS - 3000) / 5000, 0, 1)
    curve = 0.3 + np.where(STEPS >= 3000, 0.25 + 0.25 * climb, 0.0)
    report = detect_sudden_convergence(STEPS, curve)
    assert report.converged and not report.sudden
    assert report.sharpest_step == 3000
    assert report.sharpest_share == pytest.approx(0.25 / (report.final - report.baseline), rel=0.02)
    assert report.sharpest_share > 0.45


def test_a_flat_noisy_curve_has_not_converged():
    report = detect_sudden_convergence(STEPS, _noisy(np.full(STEPS.shape, 0.12), 0, 0.02))
    assert not report.converged and report.step is None and not report.sudden


def test_a_single_noisy_spike_is_not_taken_for_the_jump():
    curve = np.where(STEPS >= 7000, 0.8, 0.1)
    curve[20] = 0.9  # one lucky evaluation at step 2000
    report = detect_sudden_convergence(STEPS, curve)
    assert report.step == 7000 and report.sudden


def test_bad_input():
    with pytest.raises(ValueError, match="same length >= 5"):
        detect_sudden_convergence([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="strictly increasing"):
        detect_sudden_convergence([0, 1, 1, 2, 3], [0.1] * 5)
    with pytest.raises(ValueError, match="finite"):
        detect_sudden_convergence(range(5), [0.1, float("nan"), 0.1, 0.1, 0.1])


def test_the_sharpest_interval_is_looked_for_within_the_jump_not_in_noise_around_it():
    # a jump spread evenly over five evaluations from step 5000, and a two-evaluation noise
    # bump long before it whose rise is larger than any single rise of the jump
    curve = 0.1 + 0.7 * np.clip((STEPS - 4900) / 500, 0, 1)
    curve[10:12] = 0.4
    report = detect_sudden_convergence(STEPS, curve)
    assert (report.start, report.end) == (5000, 5300)
    assert 5000 <= report.sharpest_step <= 5300
    assert report.sharpest_share == pytest.approx(0.2)
