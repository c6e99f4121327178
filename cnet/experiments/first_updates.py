r"""The first three updates of a real training run, exactly (Eq. 6-8 over the whole ControlNet).

At initialisation every zero convolution is 0, so the gradient reaches the network in stages:

* **update 1**: only the 12 + 1 residual zero convolutions :math:`\Theta_{z2}` have a non-zero
  gradient (:math:`\partial Z/\partial W = I \ne 0`); everything behind them gets exactly 0,
  because :math:`\partial Z/\partial I = W = 0` (Eq. 6);
* **update 2**: those weights are no longer 0 (Eq. 7), so the trainable copy :math:`\Theta_c`
  and the condition encoder's zero convolution :math:`\Theta_{z1}` get gradient (Eq. 8); the
  encoder's inner layers still get 0, behind :math:`\Theta_{z1}`, which is still 0;
* **update 3**: the encoder's inner layers get gradient too.

"Gets gradient" is not "moves" with AdamW: its decoupled weight decay shrinks every parameter
that has a gradient tensor (a zero one included) by the factor
:math:`1 - \text{lr}\cdot\text{wd}` at every update, and its
first step is :math:`-\text{lr}\; g/(|g| + \epsilon) \approx -\text{lr}\,\operatorname{sign}(g)`
(the bias-corrected moments are :math:`g` and :math:`g^2`), not Eq. 7's
:math:`-\text{lr}\; g`. :func:`first_updates` measures all of it on the training loop itself
(:func:`cnet.train.train` with an ``on_update`` hook), in fp32: a skipped fp16 update would
shift every later one.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch

from ..controlnet import ControlNet
from ..train.config import TrainConfig
from ..train.loop import train
from ..train.norms import hint_inner_parameters

__all__ = ["GROUPS", "first_updates", "parameter_groups"]

GROUPS = (
    "residual zero convs",
    "condition encoder's zero conv",
    "condition encoder's inner layers",
    "trainable copy",
)


def parameter_groups(controlnet: ControlNet) -> dict[str, list[torch.nn.Parameter]]:
    """The ControlNet's trainable parameters in the four groups of the cascade."""
    residual = [
        p for z in [*controlnet.zero_convs, controlnet.mid_zero_conv] for p in z.parameters()
    ]
    groups = {
        GROUPS[0]: residual,
        GROUPS[1]: list(controlnet.hint_encoder.zero_conv.parameters()),
        GROUPS[2]: hint_inner_parameters(controlnet),
        GROUPS[3]: controlnet.theta_c_parameters(),
    }
    return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors] or [torch.zeros(0)])


def _update_facts(
    before: list[torch.Tensor],
    after: list[torch.Tensor],
    grads: list[torch.Tensor],
    lr: float,
    weight_decay: float,
) -> dict:
    g, w0, w1 = _flat(grads), _flat(before), _flat(after)
    decayed = [b * (1 - lr * weight_decay) for b in before]  # AdamW's decay, as foreach does
    return {
        "grad_norm": float(g.norm()),
        "grad_exactly_zero": bool(torch.count_nonzero(g) == 0),
        "moved": bool(torch.count_nonzero(w1 - w0) > 0),
        # with a zero gradient AdamW changes nothing but the decay: bit for bit on the CPU
        # (foreach AdamW); CUDA's fused kernel computes p - lr*wd*p, which may round the
        # last bit the other way
        "decay_only": all(torch.equal(a, d) for a, d in zip(after, decayed, strict=True)),
        "decay_only_within_1_ulp": all(
            torch.allclose(a, d, rtol=torch.finfo(a.dtype).eps, atol=0)
            for a, d in zip(after, decayed, strict=True)
        ),
        "update_norm": float((w1 - w0).norm()),
    }


def _first_step(before, after, grads, lr: float, weight_decay: float, eps: float) -> dict:
    """Update 1 of the residual zero convolutions against AdamW's formula and Eq. 7's SGD."""
    g, w0, w1 = _flat(grads), _flat(before), _flat(after)
    step = w1 - w0
    adam = -lr * g / (g.abs() + eps) - lr * weight_decay * w0
    sgd = -lr * g  # Eq. 7
    nonzero = g != 0
    return {
        "lr": lr,
        "max_abs_step": float(step.abs().max()),
        "max_deviation_from_adamw_formula": float((step - adam).abs().max()),
        # |step| = lr |g| / (|g| + eps): close to lr only where |g| is well above eps
        "share_within_1pct_of_lr": float(
            ((step.abs() - lr).abs() <= 0.01 * lr)[nonzero].double().mean()
        ),
        "share_within_10pct_of_lr": float(
            ((step.abs() - lr).abs() <= 0.1 * lr)[nonzero].double().mean()
        ),
        "median_abs_grad": float(g.abs()[nonzero].median()),
        "sgd_step_norm": float(sgd.norm()),
        "adamw_step_norm": float(step.norm()),
        "cosine_adamw_vs_sgd": float(torch.nn.functional.cosine_similarity(step, sgd, dim=0)),
    }


def first_updates(config: TrainConfig, updates: int = 3) -> dict:
    """Train ``updates`` steps of ``config`` (no evaluation, in a temporary folder) and report,
    per update and per parameter group (:data:`GROUPS`): the gradient's norm and whether it is
    exactly zero, whether the parameters moved, and whether they moved by AdamW's weight decay
    alone (bit for bit); and update 1 of the residual zero convolutions against AdamW's formula
    and Eq. 7's SGD step (``first_step``; absent where there are no such convolutions)."""
    seen: list[dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]] = []
    net: list[ControlNet] = []

    def record(step: int, controlnet: ControlNet) -> None:
        net[:] = [controlnet]
        seen.append(
            {
                name: (
                    [p.detach().clone() for p in ps],
                    [
                        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                        for p in ps
                    ],
                )
                for name, ps in parameter_groups(controlnet).items()
            }
        )

    with tempfile.TemporaryDirectory() as out:
        run = dataclasses.replace(
            config, steps=updates, eval_every=0, out=out, resume=False, mixed_precision="no"
        )
        train(run, profile="first updates", on_update=record)
    final = {
        name: [p.detach().clone() for p in ps] for name, ps in parameter_groups(net[0]).items()
    }
    afters = [{k: v[0] for k, v in s.items()} for s in seen[1:]] + [final]
    lr, wd = config.lr, config.weight_decay
    report = {
        "updates": [
            {
                name: _update_facts(seen[k][name][0], afters[k][name], seen[k][name][1], lr, wd)
                for name in GROUPS
            }
            for k in range(updates)
        ]
    }
    if seen[0][GROUPS[0]][0]:  # an ablation without connection layers has none to compare
        report["first_step"] = _first_step(
            seen[0][GROUPS[0]][0], afters[0][GROUPS[0]], seen[0][GROUPS[0]][1], lr, wd, eps=1e-8
        )
    return report
