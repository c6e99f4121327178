"""What a logged training step records of the ControlNet: each zero convolution's weight and
gradient norm, the trainable copy's gradient norm and that of the condition encoder's inner
layers, brought to the host in one transfer. Eq. 6 and Eq. 8 made visible, as a three-update
cascade: at update 1 only the 12 + 1 residual zero convolutions have a non-zero gradient; at
update 2 the copy and the condition encoder's zero convolution too; the encoder's inner layers,
behind that still-zero convolution, only from update 3."""

from __future__ import annotations

import torch

from ..controlnet import ControlNet

__all__ = ["hint_inner_parameters", "logged_norms", "trained_norms", "zero_conv_norms"]


def _norms(groups: dict[str, list[torch.Tensor | None]]) -> dict[str, float]:
    """The L2 norm of each group of tensors, all brought to the host in one transfer: a GPU
    waits once per logged step, not once per tensor."""
    norms = []
    for tensors in groups.values():
        parts = [torch.linalg.vector_norm(t.detach().float()) for t in tensors if t is not None]
        norms.append(
            torch.linalg.vector_norm(torch.stack(parts))
            if parts
            else torch.zeros((), device=_device_of(groups))
        )
    return dict(zip(groups, torch.stack(norms).tolist(), strict=True))


def _device_of(groups: dict[str, list[torch.Tensor | None]]) -> torch.device:
    return next(
        (t.device for ts in groups.values() for t in ts if t is not None), torch.device("cpu")
    )


def _zero_conv_groups(controlnet: ControlNet, grads: bool) -> dict[str, list]:
    # an ablation without connection layers (cnet.variants) has nothing to record there
    return {
        name: [conv.weight.grad, conv.bias.grad] if grads else [conv.weight, conv.bias]
        for name, conv in controlnet.zero_convolutions.items()
        if hasattr(conv, "weight")
    }


def hint_inner_parameters(controlnet: ControlNet) -> list[torch.nn.Parameter]:
    """The condition encoder's layers before its zero convolution."""
    last = {id(p) for p in controlnet.hint_encoder.zero_conv.parameters()}
    return [p for p in controlnet.hint_encoder.parameters() if id(p) not in last]


def zero_conv_norms(controlnet: ControlNet, grads: bool = False) -> dict[str, float]:
    """The weight norm (or gradient norm) of each zero convolution, by the names of
    :attr:`ControlNet.zero_convolutions`."""
    return _norms(_zero_conv_groups(controlnet, grads))


def logged_norms(controlnet: ControlNet) -> dict:
    """What a logged step records: each zero convolution's weight norm and gradient norm, the
    trainable copy's gradient norm and the condition encoder's inner layers' (``hint_grad_norm``),
    in one transfer to the host."""
    groups = {("weight_norm", k): v for k, v in _zero_conv_groups(controlnet, False).items()}
    groups |= {("grad_norm", k): v for k, v in _zero_conv_groups(controlnet, True).items()}
    groups[("copy_grad_norm", "")] = [p.grad for p in controlnet.theta_c_parameters()]
    groups[("hint_grad_norm", "")] = [p.grad for p in hint_inner_parameters(controlnet)]
    entry: dict = {"weight_norm": {}, "grad_norm": {}}
    for (kind, name), norm in _norms(groups).items():
        if not name:
            entry[kind] = norm
        else:
            entry[kind][name] = norm
    return entry


def trained_norms(trained: torch.nn.Module) -> dict:
    """What a logged step of a run of another method than ControlNet records (T2I-Adapter,
    ControlNet-XS, channel concatenation): the gradient norm of everything it trains
    (``trained_grad_norm``). Such a run has no trainable copy of ControlNet's and no condition
    encoder of its, so their entries are empty (``copy_grad_norm`` None)."""
    (norm,) = _norms({"trained": [p.grad for p in trained.parameters()]}).values()
    return {"weight_norm": {}, "grad_norm": {}, "copy_grad_norm": None, "trained_grad_norm": norm}
