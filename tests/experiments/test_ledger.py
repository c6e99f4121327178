"""The claim ledger (cnet.experiments.ledger): each verdict follows the stated rule from the
paired differences, the interval is the exact bootstrap's, a claim whose runs are missing says
so, and the shipped ledger is what the rule gives on the shipped runs."""

import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from cnet.experiments.ledger import (
    CLAIMS,
    Claim,
    bootstrap_interval,
    claim_ledger,
    ledger_table,
    sign_test_p,
)

SHIPPED = Path(__file__).resolve().parents[2] / "figures" / "07_ablations.json"


def _run(seed, final, step0=0.3, onset=100, sudden=True, deviation=0.0, curve=None):
    iou = curve or [step0, step0, final]
    return {
        "seed": seed,
        "final": {"iou": final},
        "curves": {"iou": iou},
        "onset": onset,
        "report": {"sudden": sudden},
        "step0_deviation": deviation,
        "prompt_free_layout_iou": final,
    }


def _result(**variants):
    return {
        "variants": {
            name: {"runs": [_run(s, v) for s, v in enumerate(finals)]}
            for name, finals in variants.items()
        }
    }


FINAL = lambda run: run["final"]["iou"]  # noqa: E731
BELOW = Claim("a below b", "test", "direction", "a", "final IoU", "b", FINAL, sign=-1)


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test_p(5, 5) == 1 / 32
    assert sign_test_p(4, 5) == 6 / 32
    assert sign_test_p(0, 5) == 1.0


def test_bootstrap_interval_is_over_every_resample():
    d = [0.1, -0.2, 0.4]
    means = sorted(np.mean([d[i] for i in idx]) for idx in product(range(3), repeat=3))
    low, high = bootstrap_interval(d)
    assert (low, high) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    assert bootstrap_interval(d) == (low, high)  # no random draws
    assert bootstrap_interval([0.5] * 5) == (0.5, 0.5)
    low, high = bootstrap_interval([0.01, 0.02, 0.03, 0.04, 0.05])
    assert 0.01 < low < 0.03 < high < 0.05
    with pytest.raises(ValueError, match="differences: empty"):
        bootstrap_interval([])


def test_direction_verdicts_follow_the_rule_seed_by_seed():
    b = [0.8, 0.7, 0.6, 0.5, 0.4]
    below = [x - 0.01 for x in b]
    (row,) = claim_ledger(_result(a=below, b=b), [BELOW])
    assert row["verdict"] == "reproduced" and row["agree"] == 5 and row["p_all_agree"] == 1 / 32
    assert row["differences"] == pytest.approx([-0.01] * 5)
    # pooled means would hide it: a is below b on every seed though their ranges overlap
    (row,) = claim_ledger(_result(a=[x + 0.01 for x in b], b=b), [BELOW])
    assert row["verdict"] == "contradicted" and row["against"] == 5
    mixed = below[:4] + [b[4] + 0.2]
    (row,) = claim_ledger(_result(a=mixed, b=b), [BELOW])
    assert row["verdict"] == "undecided" and (row["agree"], row["against"]) == (4, 1)
    tie = below[:4] + [b[4]]  # a tie counts for neither side
    (row,) = claim_ledger(_result(a=tie, b=b), [BELOW])
    assert row["verdict"] == "undecided" and (row["agree"], row["against"]) == (4, 0)


def test_about_equal_needs_the_interval_inside_the_margin():
    claim = Claim("a = b", "test", "about_equal", "a", "final IoU", "b", FINAL, margin=0.05)
    b = [0.5, 0.6, 0.7, 0.8, 0.9]
    near = [x + d for x, d in zip(b, (0.01, -0.02, 0.0, 0.02, -0.01), strict=True)]
    assert claim_ledger(_result(a=near, b=b), [claim])[0]["verdict"] == "reproduced"
    assert claim_ledger(_result(a=[x + 0.2 for x in b], b=b), [claim])[0]["verdict"] == (
        "contradicted"
    )
    spread = [x + d for x, d in zip(b, (0.1, -0.1, 0.0, 0.1, -0.1), strict=True)]
    assert claim_ledger(_result(a=spread, b=b), [claim])[0]["verdict"] == "undecided"


def test_per_seed_claims_and_claims_not_run():
    sudden = next(c for c in CLAIMS if c.variant == "default-2x")
    result = {"variants": {"default-2x": {"runs": [_run(s, 0.8) for s in range(5)]}}}
    assert claim_ledger(result, [sudden])[0]["verdict"] == "reproduced"
    result["variants"]["default-2x"]["runs"][2]["report"]["sudden"] = False
    row = claim_ledger(result, [sudden])[0]
    assert (row["verdict"], row["holds"], row["n"]) == ("undecided", 4, 5)
    for run in result["variants"]["default-2x"]["runs"]:
        run["onset"] = None  # no onset: not sudden, whatever the detector said
    assert claim_ledger(result, [sudden])[0]["verdict"] == "contradicted"
    kept = next(c for c in CLAIMS if c.variant == "data-1k")
    collapsed = {"variants": {"data-1k": {"runs": [_run(0, 0.5, curve=[0.3, 0.8, 0.5])]}}}
    assert claim_ledger(collapsed, [kept])[0]["verdict"] == "contradicted"  # 0.5 < 0.9 x 0.8
    row = claim_ledger({"variants": {"a": {"runs": []}}}, [BELOW])[0]
    assert row["verdict"] == "not run" and row["missing"] == ["b"]
    assert "not run: b" in ledger_table([row])


def test_the_shipped_ledger_is_the_rule_applied_to_the_shipped_runs():
    result = json.loads(SHIPPED.read_text())
    assert result["ledger"] == json.loads(json.dumps(claim_ledger(result)))
    assert len(result["ledger"]) == len(CLAIMS)
    assert {row["verdict"] for row in result["ledger"]} <= {
        "reproduced",
        "contradicted",
        "undecided",
        "not run",
    }


def test_the_readme_quotes_the_shipped_ledger():
    readme = (SHIPPED.parents[1] / "README.md").read_text()
    assert ledger_table(json.loads(SHIPPED.read_text())["ledger"]) in readme
