"""How the benchmarks measure: wall time of steps interleaved side by side (so a noisy machine's
drift hits both alike), and peak memory of one step.

* **Time**: after ``warmup`` untimed calls of each, the callables run in turn, A B A B ..., and
  each keeps its own times; the figure is the ratio of medians. On CUDA every call ends in
  ``torch.cuda.synchronize()``, so a time is the step's, not its launch's.
* **Peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` over one step; on the CPU,
  :class:`LiveTensorBytes`, which sees every tensor storage that exists or is made during the
  step (parameters, buffers, gradients, optimizer state, the batch, activations, temporaries)
  and keeps the peak of their sum, as torch's own ``MemTracker`` does (which cannot be used
  here: it hooks every parameter, and a locked U-Net's parameters take no hooks). Both count
  tensors, not the allocator's cache or the process's code, so a ratio compares what the two
  steps hold.
"""

from __future__ import annotations

import platform
import statistics
import time
import weakref
from collections.abc import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LiveTensorBytes", "interleaved_times", "machine", "peak_memory", "ratio"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    calls: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` each, run in turn."""
    device = torch.device(device)
    for _ in range(warmup):
        for call in calls.values():
            call()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(times[numerator]) / statistics.median(times[denominator])


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, while the mode is on: every storage an
    operator returns is counted once, from when it appears until Python frees it (a weak
    reference's callback), as torch's ``MemTracker`` counts them."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for tensor in existing:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        size = storage.nbytes()
        self.live[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._track(tensor)
        return out


def _tensors_held(
    modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer, extra: list[torch.Tensor]
) -> list[torch.Tensor]:
    held = list(extra)
    for module in modules:
        held += list(module.parameters()) + list(module.buffers())
        held += [p.grad for p in module.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        held += [v for v in state.values() if torch.is_tensor(v)]
    return held


def peak_memory(
    step: Callable[[], object],
    modules: list[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    extra: list[torch.Tensor] = (),
) -> int:
    """Peak bytes of tensors alive during one call of ``step`` (run it once before, so that the
    optimizer's state exists, as in every step but the first). ``extra``: more tensors that
    are held throughout (the batch)."""
    device = torch.device(device)
    held = _tensors_held(modules, optimizer, list(extra))
    if device.type == "cuda":
        # other steps' models live on the device too: count this step's tensors, and what the
        # step allocates above what was there before it
        own = sum(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values()
        )
        del held  # no reference of ours may keep a tensor the step frees alive
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before + own)
    tracker = LiveTensorBytes(held)
    del held  # no reference of ours may keep a tensor the step frees alive
    with tracker:
        step()
    return tracker.peak


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
