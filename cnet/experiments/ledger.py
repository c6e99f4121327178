r"""The claim ledger: what the paper (and its author's training notes) claim that the ablations
can test, what was measured, over how many paired seeds, and a verdict by one stated rule.

Every run of a variant and of its reference share a seed (:mod:`cnet.experiments.ablate`), so a
claim is judged on the **paired differences**
:math:`d_s = m(\text{variant}, s) - m(\text{reference}, s)`, one per seed :math:`s`, never on two
pooled means. The verdict rule (:data:`VERDICT_RULE`):

* a **direction** claim ("lite ends below the full copy") is *reproduced* when :math:`d_s` has the
  claimed sign on every seed, *contradicted* when it has the opposite sign on every seed, and
  *undecided* otherwise (a tie counts for neither side). With :math:`n` seeds, the exact one-sided
  sign test gives :math:`p = 2^{-n}` to "every seed agrees" when the variant makes no difference
  (a fair coin per seed): 1/32 for 5 seeds;
* a **per-seed** claim ("a run on 1k samples does not collapse") is *reproduced* when it holds on
  every seed, *contradicted* when it fails on every seed, *undecided* otherwise;
* an **about-equal** claim ("Gaussian connections train about as badly as lite") is *reproduced*
  when the 95 % bootstrap interval of the mean paired difference lies inside
  :math:`\pm` ``margin``, *contradicted* when it lies wholly outside it, *undecided* otherwise.

Beside each verdict the ledger gives the mean paired difference with its 95 % percentile-bootstrap
interval (:func:`bootstrap_interval`: every one of the :math:`n^n` resamples of the :math:`n`
differences when :math:`n \le 6`, so the interval is exact and needs no random draws). Many
claims are judged at once: if no variant made any difference, each direction row would still
reach a verdict (one way or the other) with probability :math:`2 \cdot 2^{-n}` = 1/16 for 5 seeds,
so among the ledger's rows a chance verdict is expected about once in every 16 such rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

from .ablate import RUN_MEASURES
from .recipe import COLLAPSE_SHARE, collapsed

__all__ = [
    "CLAIMS",
    "Claim",
    "VERDICT_RULE",
    "bootstrap_interval",
    "claim_ledger",
    "ledger_table",
    "paired",
    "paired_runs",
    "sign_test_p",
]

#: The rule every verdict follows, in one sentence per kind of claim (notebook 07 prints it
#: before the ledger).
VERDICT_RULE = (
    "direction claims: reproduced when the paired difference has the claimed sign on every seed, "
    "contradicted when it has the opposite sign on every seed, undecided otherwise (exact "
    "one-sided sign test: p = 2^-n that every seed agrees by chance); per-seed claims: "
    "reproduced when the claim holds on every seed, contradicted when it fails on every seed, "
    "undecided otherwise; about-equal claims: reproduced when the 95 % bootstrap interval of the "
    "mean paired difference lies inside ± the margin, contradicted when it lies wholly outside, "
    "undecided otherwise"
)


_final_iou = RUN_MEASURES["final_iou"]
_step0_iou = RUN_MEASURES["step0_iou"]
_prompt_free = RUN_MEASURES["prompt_free_layout_iou"]


def _kept_exactly(run: dict) -> bool:
    return run["step0_deviation"] == 0.0


def _sudden(run: dict) -> bool:
    return run["onset"] is not None and bool(run["report"]["sudden"])


def _learned_and_kept(run: dict) -> bool:
    return run["onset"] is not None and not collapsed(run["curves"]["iou"])


@dataclass(frozen=True)
class Claim:
    """One row of the ledger: ``kind`` is "direction" (``sign`` of variant − reference claimed),
    "per_seed" (``holds`` claimed on every run of ``variant``) or "about_equal" (variant −
    reference within ± ``margin``)."""

    claim: str
    source: str
    kind: str
    variant: str
    measure: str  # what is measured, in words
    reference: str | None = None
    value: Callable[[dict], float] | None = None
    sign: int = 0
    holds: Callable[[dict], bool] | None = None
    margin: float = 0.0


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "Zero convolutions leave the base exactly as it was before any update",
        "arXiv v1 §3.1, Eq. 3–4",
        "per_seed",
        "default",
        "controlled U-Net's prediction − locked U-Net's, at step 0: exactly 0",
        holds=_kept_exactly,
    ),
    Claim(
        "Gaussian-initialised connections damage the base at the start",
        "ICCV §4.2 (v1 Fig. 8b, images only)",
        "direction",
        "gaussian",
        "step-0 IoU, against the locked base's (the default's step 0)",
        reference="default",
        value=_step0_iou,
        sign=-1,
    ),
    Claim(
        "Gaussian-initialised connections end below zero convolutions",
        "ICCV §4.2",
        "direction",
        "gaussian",
        "final IoU",
        reference="default",
        value=_final_iou,
        sign=-1,
    ),
    Claim(
        "Gaussian-initialised connections train about as badly as ControlNet-lite",
        "ICCV §4.2 (v1 Fig. 8b)",
        "about_equal",
        "gaussian",
        "final IoU, Gaussian − lite (margin ± 0.05)",
        reference="lite",
        value=_final_iou,
        margin=0.05,
    ),
    Claim(
        "ControlNet-lite ends below the full trainable copy",
        "ICCV §4.2, Table 2 (0.32 vs 0.35)",
        "direction",
        "lite",
        "final IoU",
        reference="default",
        value=_final_iou,
        sign=-1,
    ),
    Claim(
        "Exactly zero matters: zero convolutions end above connections of std = lr",
        "cnet's question (after one AdamW update every zero-conv weight is about ± lr)",
        "direction",
        "gaussian-lr",
        "final IoU",
        reference="default",
        value=_final_iou,
        sign=-1,
    ),
    Claim(
        "A ControlNet starts following its condition suddenly",
        "ICCV §3.3 (v1 Fig. 4, samples)",
        "per_seed",
        "default-2x",
        "an onset, and the detector's abruptness ≤ 0.25 (cnet.train.convergence), at 2× the steps",
        holds=_sudden,
    ),
    Claim(
        "Empty prompts in training make control without a prompt work",
        "ICCV §3.3",
        "direction",
        "no-empty-prompts",
        "prompt-free layout IoU, no empty prompts − 50 % empty",
        reference="default",
        value=_prompt_free,
        sign=-1,
    ),
    Claim(
        "Training on 1k samples does not collapse",
        "ICCV §4 (dataset size)",
        "per_seed",
        "data-1k",
        f"an onset, and final IoU ≥ {COLLAPSE_SHARE} × its best",
        holds=_learned_and_kept,
    ),
    Claim(
        "A larger batch beats more steps, at the same samples",
        "author's docs/train.md (not the paper)",
        "direction",
        "accum-2",
        "final IoU, 2 micro-batches × 400 updates − 1 × 800 updates",
        reference="default-2x",
        value=_final_iou,
        sign=+1,
    ),
)


def sign_test_p(agree: int, n: int) -> float:
    """Exact one-sided sign test: the probability that ``agree`` or more of ``n`` fair coins
    land on the claimed side."""
    return sum(comb(n, k) for k in range(agree, n + 1)) / 2**n


def bootstrap_interval(
    differences: Sequence[float], level: float = 0.95, draws: int = 20_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``differences``: over every one of the
    :math:`n^n` resamples when :math:`n \\le 6` (exact, no random draws), else over ``draws``
    seeded ones."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("differences: empty; expected at least one paired difference")
    if n <= 6:
        index = np.array(list(itertools.product(range(n), repeat=n)))
    else:
        index = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    means = np.sort(d[index].mean(axis=1))
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired(result: dict, variant: str, reference: str, value: Callable[[dict], float]) -> dict:
    """``variant`` against ``reference`` seed by seed: the differences (seeds where either
    has no value are left out and counted), their mean and 95 % bootstrap interval, and on how
    many seeds the variant is higher and lower."""
    runs, other = result["variants"][variant]["runs"], result["variants"][reference]["runs"]
    return paired_runs(runs, other, value)


def paired_runs(
    runs: Sequence[dict], other: Sequence[dict], value: Callable[[dict], float]
) -> dict:
    """:func:`paired` on two lists of runs (each a dict with its ``seed``)."""
    runs, other = {r["seed"]: r for r in runs}, {r["seed"]: r for r in other}
    seeds = sorted(set(runs) & set(other))
    values = {s: (value(runs[s]), value(other[s])) for s in seeds}
    have = [s for s in seeds if None not in values[s]]
    d = [values[s][0] - values[s][1] for s in have]
    out = {"seeds": have, "without_value": len(seeds) - len(have), "differences": d}
    if not d:
        return out
    low, high = bootstrap_interval(d)
    return out | {
        "mean_difference": float(np.mean(d)),
        "interval": [low, high],
        "higher": int(sum(x > 0 for x in d)),
        "lower": int(sum(x < 0 for x in d)),
    }


def _row(claim: Claim, result: dict) -> dict:
    row = {
        "claim": claim.claim,
        "source": claim.source,
        "kind": claim.kind,
        "variant": claim.variant,
        "reference": claim.reference,
        "measure": claim.measure,
    }
    needed = [v for v in (claim.variant, claim.reference) if v]
    missing = [v for v in needed if v not in result["variants"]]
    if missing:
        return row | {"n": 0, "verdict": "not run", "missing": missing}
    if claim.kind == "per_seed":
        runs = {run["seed"]: run for run in result["variants"][claim.variant]["runs"]}
        held = [bool(claim.holds(runs[s])) for s in sorted(runs)]
        k, n = sum(held), len(held)
        verdict = "reproduced" if k == n else "contradicted" if k == 0 else "undecided"
        return row | {"n": n, "holds": k, "verdict": verdict}
    comparison = paired(result, claim.variant, claim.reference, claim.value)
    n = len(comparison["differences"])
    row |= {"n": n} | {k: comparison[k] for k in ("seeds", "differences")}
    row |= {k: comparison[k] for k in ("mean_difference", "interval")}
    if claim.kind == "direction":
        side = {+1: "higher", -1: "lower"}
        agree, against = comparison[side[claim.sign]], comparison[side[-claim.sign]]
        verdict = "reproduced" if agree == n else "contradicted" if against == n else "undecided"
        return row | {
            "agree": agree,
            "against": against,
            "p_all_agree": sign_test_p(n, n),
            "verdict": verdict,
        }
    low, high = comparison["interval"]
    inside = -claim.margin <= low and high <= claim.margin
    outside = low > claim.margin or high < -claim.margin
    verdict = "reproduced" if inside else "contradicted" if outside else "undecided"
    return row | {"margin": claim.margin, "verdict": verdict}


def claim_ledger(result: dict, claims: Sequence[Claim] = CLAIMS) -> list[dict]:
    """One row per claim, judged on the ablations' summary
    (:func:`cnet.experiments.ablate.summarize`) by :data:`VERDICT_RULE`; a claim whose variants
    were not run says so ("not run") rather than being judged."""
    return [_row(claim, result) for claim in claims]


def _effect(row: dict) -> str:
    if row["verdict"] == "not run":
        return "not run: " + ", ".join(row["missing"])
    if row["kind"] == "per_seed":
        return f"holds on {row['holds']} of {row['n']} seeds"
    low, high = row["interval"]
    text = f"{row['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
    if row["kind"] == "direction":
        return text + f"; claimed sign on {row['agree']} of {row['n']} seeds"
    return text + f"; margin ± {row['margin']:.2f}"


def ledger_table(rows: Sequence[dict]) -> str:
    """The ledger as a Markdown table (README, notebook 07)."""
    lines = [
        "| claim | source | measured | n | paired effect [95 % interval] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['claim']} | {row['source']} | {row['measure']} | {row['n']} "
            f"| {_effect(row)} | **{row['verdict']}** |"
        )
    return "\n".join(lines)
