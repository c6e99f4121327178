"""bench/: the memory counter counts exactly, the quick bench runs and writes results of the
committed shape, and the committed results say how they were made."""

import json
import math
from pathlib import Path

import pytest
import torch

from cnet.__main__ import _parser, main
from cnet.bench.measure import LiveTensorBytes, interleaved_times, peak_memory

ROOT = Path(__file__).resolve().parents[2]
SUITES = ("step_cost", "loop_cost", "scaling", "loop_overheads", "sampling_cost", "step_speedups")


def test_live_tensor_bytes_counts_what_is_alive_exactly():
    held = torch.ones(1000)  # 4000 bytes, there before and after
    with LiveTensorBytes([held]) as tracker:
        doubled = held * 2  # +4000
        shifted = doubled + 1  # +4000: 12000 alive at once
        del doubled  # -4000
        view = shifted[:10]  # a view: no new storage
        assert tracker.current == 8000
        again = torch.zeros(500)  # +2000 -> 10000, below the peak
        del view, again
    assert tracker.peak == 12000
    assert tracker.current == 8000


def test_peak_memory_of_a_training_step_adds_up():
    model = torch.nn.Linear(100, 100, bias=False)  # 40 000 bytes of weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(10, 100)  # 4000 bytes

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        optimizer.step()

    step()
    peak = peak_memory(step, [model], optimizer, extra=[x])
    # the weight, its gradient and the input at once (the (10, 100) output is not kept for a
    # sum's backward), plus at most two activations of the output's size
    assert 40_000 + 40_000 + 4000 <= peak <= 40_000 + 40_000 + 4000 + 2 * 4000


def test_interleaved_times_runs_each_in_turn():
    order = []
    times = interleaved_times(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1
    )
    assert order == ["a", "b"] * 4 and all(len(t) == 3 for t in times.values())


@pytest.mark.slow
def test_quick_bench_writes_every_suite(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    for name in SUITES:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        _check_record(record, name, "quick")
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "step_cost.png",
        "loop_cost.png",
        "scaling.png",
    }
    sampling = json.loads((tmp_path / "sampling_cost.json").read_text())["results"]
    assert sampling["bit_for_bit"] is True  # exact, not timed: encoding once changes no number
    step = json.loads((tmp_path / "step_cost.json").read_text())["results"][0]
    # exact, not timed: the ControlNet step holds no gradient or Adam state for the locked U-Net
    assert step["memory_ratio"] < 1
    assert step["trainable_parameters"]["controlnet"] < step["trainable_parameters"]["finetune"]


def _check_record(record: dict, name: str, plan: str) -> None:
    assert record["suite"] == name and record["plan"] == plan
    assert record["command"].startswith("python -m cnet bench")
    assert {"torch", "cpu", "threads"} <= set(record["machine"]) and record["date"]
    results = record["results"]
    for entry in results if isinstance(results, list) else [results]:
        numbers = {
            "step_cost": ("time_ratio", "memory_ratio"),
            "loop_cost": ("speedup",),
            "scaling": (),
            "loop_overheads": ("data_share", "logging_ratio"),
            "sampling_cost": ("time_ratio",),
            "step_speedups": (),
            "method_cost": (),
        }[name]
        if name == "method_cost":
            assert entry["step_time_ratio"]["controlnet"] == 1.0
            assert entry["sampling_ratio"]["base"] == 1.0
            for ratios in ("step_time_ratio", "memory_ratio", "sampling_ratio"):
                assert all(math.isfinite(v) and v > 0 for v in entry[ratios].values()), ratios
            # exact, not timed: the adapter holds fewer weights, gradients, Adam state and
            # activations than ControlNet's copy (the concatenation's order against ControlNet
            # turns with the batch: Adam's state for the whole U-Net against the copy's
            # activations)
            memory = entry["peak_memory_bytes"]
            assert memory["t2i-adapter"] < memory["controlnet"]
        if name == "step_speedups":
            ratios = entry["time_ratio"]
            assert ratios["plain"] == 1.0 and set(ratios) >= {"plain", "channels_last"}
            assert all(math.isfinite(r) and r > 0 for r in ratios.values())
        for key in numbers:
            assert math.isfinite(entry[key]) and entry[key] > 0, key
        if name == "scaling":
            for axis in ("batch", "latent_size"):
                assert len(entry[axis]["sizes"]) == len(entry[axis]["step_ms"])
                assert entry[axis]["relative"][0] == 1.0


@pytest.mark.parametrize("name", SUITES)
def test_the_committed_results_are_the_full_bench(name):
    record = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    _check_record(record, name, "full")
    assert "--out bench/results" in record["command"]


def test_a_bench_run_writes_outside_the_committed_results_unless_asked():
    assert _parser().parse_args(["bench"]).out == "runs/bench"
    assert main(["bench", "--threads", "0"]) == 2


def test_the_readmes_quote_the_committed_results():
    from cnet.bench.report import tables

    results = {
        n: json.loads((ROOT / "bench" / "results" / f"{n}.json").read_text()) for n in SUITES
    }
    quoted = tables(results)
    bench_readme = (ROOT / "bench" / "README.md").read_text()
    for name, table in quoted.items():
        assert table in bench_readme, name
    readme = (ROOT / "README.md").read_text()
    assert quoted["step_cost"] in readme and quoted["loop_cost"] in readme
