"""The methods comparison (cnet.experiments.methods, cnet.course.methods): every method's run is
the one loop's, made by the command it records; what it measures of a run means what it says
(the base kept exactly, or not, before any update and at weight 0); the summary, its table and
its paired verdicts, and the shipped results notebook 08 and the README quote."""

import json
from pathlib import Path

import pytest
from _tiny_unets import tiny_run

import cnet.experiments.methods as methods
from cnet.train import SettingError
from cnet.train.config import PROFILES

SHIPPED = Path(__file__).resolve().parents[2] / "figures" / "08_methods.json"


def test_each_run_has_the_train_command_that_makes_it(monkeypatch):
    from cnet.__main__ import _parser, _train_settings

    monkeypatch.chdir(SHIPPED.parents[1])  # the settings' base is relative to the clone
    for name in methods.METHODS_COMPARED:
        argv = methods.train_command(name, 2).split()[3:]
        _, config = _train_settings(_parser().parse_args(argv), "quick")
        assert config == methods.method_config(name, 2), name
    for name in methods.COMPOSING:
        argv = methods.train_command(name, 2, task="segmentation").split()[3:]
        _, config = _train_settings(_parser().parse_args(argv), "quick")
        assert config == methods.second_control_config(name, 2), name
    # the equal-wall-time arm: updates from the shipped bench's step-time ratios, the rate
    # decaying over the same share of them (3/8), the method's own run where they come out equal
    cost = json.loads((SHIPPED.parents[1] / methods.COST_FROM).read_text())["results"]
    for name in methods.METHODS_COMPARED:
        argv = methods.equal_time_command(name, 2, "runs/methods", cost).split()[3:]
        _, config = _train_settings(_parser().parse_args(argv), "quick")
        assert config == methods.equal_time_config(name, 2, "runs/methods", cost), name
        ratio = cost["step_time_ratio"][name]
        assert abs(config.steps * ratio - 800) <= 25 * ratio, name  # nearest interval of 50
        assert config.lr_decay_steps * 8 // 3 in range(config.steps - 2, config.steps + 1)
        assert config.lr_decay_start + config.lr_decay_steps == config.steps  # as the profile's
    own = {n for n in methods.METHODS_COMPARED if methods.equal_time_steps(n, cost) == 800}
    assert own == {"controlnet", "controlnet-xs"}
    # the ratio is to ControlNet's step, whatever the bench's unit; a slower method gets fewer
    # updates; a profile's floor after the decay keeps its share too
    slower = {"step_time_ratio": {"controlnet": 2.0, "t2i-adapter": 1.0, "controlnet-lite": 3.0}}
    assert methods.equal_time_steps("t2i-adapter", slower) == 1600
    assert methods.equal_time_steps("controlnet-lite", slower) == 550  # 533, to the nearest 50
    quick = {**PROFILES["quick"], "lr_decay_start": 400, "lr_decay_steps": 200}  # floor: 200
    monkeypatch.setitem(PROFILES, "quick", quick)
    longer = methods.equal_time_config("t2i-adapter", 0, "r", slower)
    assert (longer.lr_decay_start, longer.lr_decay_steps, longer.steps) == (800, 400, 1600)
    assert methods.method_config("t2i-adapter", 0).copy_lr_scale == 1.0  # the profile gave way
    assert methods.method_config("concat", 0).copy_lr_scale == PROFILES["quick"]["copy_lr_scale"]


def test_a_method_not_compared_is_refused_in_one_line():
    with pytest.raises(SettingError) as refused:
        methods.run_methods(["controlnet", "lora"], [0])
    assert str(refused.value) == (
        "methods: 'lora' is not allowed; expected some of controlnet, controlnet-lite, "
        "t2i-adapter, controlnet-xs, concat"
    )
    with pytest.raises(SettingError, match="seeds: \\[\\] is not allowed"):
        methods.summarize_methods(["controlnet"], [])


@pytest.mark.slow
def test_tiny_runs_of_every_method_measured_and_summarized(base, tmp_path, monkeypatch):
    tiny = tiny_run(base, eval_every=1, lr=2e-3, copy_lr_scale=0.5, device="cpu")
    monkeypatch.setitem(PROFILES, "quick", tiny)
    monkeypatch.setattr(methods, "TRANSFER_BASE", str(base))
    root = tmp_path / "methods"
    names = list(methods.METHODS_COMPARED)
    runs = methods.run_methods(names, [0], root)
    assert [r.relative_to(root).as_posix() for r in runs] == [f"{n}/seed0" for n in names] + [
        f"{n}/segmentation-seed0" for n in methods.COMPOSING
    ]
    result = methods.compare_methods(names, [0], root, train_runs=False, cost_from=None)
    measured = {n: result["methods"][n]["runs"][0] for n in names}
    # before any update: zero convolutions (ControlNet, lite), zero control -> base
    # convolutions (XS) and zero input channels (concatenation) keep the base bit for bit; an
    # adapter's first maps are not zero
    assert {n: m["deviation_at_init"] == 0.0 for n, m in measured.items()} == {
        n: n != "t2i-adapter" for n in names
    }
    # trained, at weight 0: the methods on a locked base give it back bit for bit; the
    # concatenation trained the base's own weights, so nothing gives it back
    assert {n: m["deviation_at_weight_0"] == 0.0 for n, m in measured.items()} == {
        n: n != "concat" for n in names
    }
    assert measured["concat"]["transfer"] is None
    # the methods that compose were measured with their second control, the others not
    assert {n: m["composition"] is not None for n, m in measured.items()} == {
        n: n in methods.COMPOSING for n in names
    }
    composition = measured["t2i-adapter"]["composition"]
    assert [r["composition"] for r in composition["rows"]] == [
        "first alone",
        "second alone",
        "both",
    ]
    # the change is reported only where the second control learned (an onset on its own task)
    change = methods.RUN_MEASURES["composition_change"](measured["t2i-adapter"])
    assert (change is None) == (composition["second"]["onset"] is None)
    assert all(measured[n]["transfer"]["fine_tune_iou"] >= 0 for n in names if n != "concat")
    parameters = {n: result["methods"][n]["trainable_parameters"] for n in names}
    assert parameters["t2i-adapter"] < parameters["controlnet"] < parameters["concat"]
    assert all(len(m["curves"]["iou"]) == 5 for m in measured.values())
    assert measured["controlnet"]["curves"]["iou"][0] == measured["controlnet"]["base_iou"]

    from cnet.course.methods import method_contrasts, methods_table, write_method_figures

    table = methods_table(result)
    assert table.count("\n") == 1 + len(names)
    assert "| exactly | no weight; condition at 0: no (" in table.splitlines()[-1]
    rows = method_contrasts(result)
    assert {r["method"] for r in rows} == set(names) - {"controlnet"}
    # one seed: every difference has one sign, so a verdict is reached (p = 1/2 by chance);
    # the rule, not the data, makes it
    assert all(r["verdict"] in ("better", "worse", "undecided", "not measured") for r in rows)
    transfer = [r for r in rows if r["measure"] == "transfer_iou" and r["method"] == "concat"]
    assert transfer[0]["verdict"] == "not measured"
    written = write_method_figures(result, tmp_path / "figures", root)
    assert [p.name for p in written] == ["08_method_curves.png", "08_method_samples.png"]
    # the equal-wall-time arm, from a bench's step-time ratios: lite and the adapter train
    # longer, ControlNet-XS and the concatenation round to their own runs
    ratios = {"controlnet": 1.0, "controlnet-lite": 0.75, "t2i-adapter": 0.5}
    ratios |= {"controlnet-xs": 1.01, "concat": 0.9}
    cost = {"suite": "method_cost", "command": "", "date": "", "machine": {}}
    cost["results"] = {"step_time_ratio": ratios, "step_ms": {n: 10 * r for n, r in ratios.items()}}
    cost_file = tmp_path / "cost.json"
    cost_file.write_text(json.dumps(cost))
    timed = methods.compare_methods(names, [0], root, cost_from=cost_file)
    arm = timed["equal_time"]
    assert arm["steps"] == {
        "controlnet": 4,
        "controlnet-lite": 5,
        "t2i-adapter": 8,
        "controlnet-xs": 4,
        "concat": 4,
    }
    assert {n for n, e in arm["methods"].items() if e.get("same_runs")} == {
        "controlnet",
        "controlnet-xs",
        "concat",
    }
    for name in ("controlnet-lite", "t2i-adapter"):
        run = arm["methods"][name]["runs"][0]
        assert run["run"] == str(root / name / "time-seed0")
        assert run["steps"] == arm["steps"][name] == run["curves"]["eval_steps"][-1]
        assert arm["methods"][name]["train_commands"] == [
            methods.equal_time_command(name, 0, root, cost["results"])
        ]
    from cnet.course.methods import equal_time_contrasts, equal_time_table

    table = equal_time_table(timed)
    assert table.count("\n") == 1 + len(names) and table.count("the same runs") == 3
    assert {r["method"] for r in equal_time_contrasts(timed)} == {"controlnet-lite", "t2i-adapter"}
    written = write_method_figures(timed, tmp_path / "figures", root)
    assert [p.name for p in written][1] == "08_equal_time_curves.png"
    # an unfinished equal-time run leaves its method out of the arm, its commands listed
    (root / "t2i-adapter" / "time-seed0" / "run.json").unlink()
    partial = methods.compare_methods(names, [0], root, train_runs=False, cost_from=cost_file)
    assert partial["equal_time"]["not_run"] == {
        "t2i-adapter": [methods.equal_time_command("t2i-adapter", 0, root, cost["results"])]
    }
    assert "t2i-adapter" not in equal_time_table(partial)
    # a method not finished on every seed is left out and its commands listed
    (root / "concat" / "seed0" / "run.json").unlink()
    partial = methods.summarize_methods(names, [0], root)
    assert "concat" not in partial["methods"]
    assert partial["not_run"] == {"concat": [methods.train_command("concat", 0, root)]}
    (root / "controlnet" / "segmentation-seed0" / "run.json").unlink()
    second = methods.summarize_methods(["controlnet"], [0], root)
    assert second["methods"]["controlnet"]["runs"][0]["composition"] is None
    assert second["not_run"] == {
        "second controls": [methods.train_command("controlnet", 0, root, "segmentation")]
    }


def test_the_shipped_summary_is_its_runs_aggregated_and_the_readme_quotes_it():
    from cnet.course.methods import (
        contrast_table,
        equal_time_contrasts,
        equal_time_table,
        method_contrasts,
        methods_table,
    )
    from cnet.experiments.ablate import spread

    result = json.loads(SHIPPED.read_text())
    assert result["seeds"] == list(methods.SEEDS) and not result["not_run"]
    assert list(result["methods"]) == list(methods.METHODS_COMPARED)
    for name, entry in result["methods"].items():
        assert [r["seed"] for r in entry["runs"]] == list(methods.SEEDS)
        assert entry["train_commands"] == [methods.train_command(name, s) for s in methods.SEEDS]
        for measure, value in methods.RUN_MEASURES.items():
            assert entry["aggregate"][measure] == spread([value(r) for r in entry["runs"]])
    # the equal-wall-time arm: its updates from the bench's ratios it quotes, each run made by
    # the command it records, aggregated as the first arm's
    arm = result["equal_time"]
    assert not arm["not_run"] and list(arm["steps"]) == list(methods.METHODS_COMPARED)
    for name, entry in arm["methods"].items():
        assert arm["steps"][name] == methods.equal_time_steps(name, result["cost"])
        commands = [
            methods.equal_time_command(name, s, "runs/methods", result["cost"])
            for s in methods.SEEDS
        ]
        assert entry["train_commands"] == commands
        if entry.get("same_runs"):
            continue
        assert [r["steps"] for r in entry["runs"]] == [arm["steps"][name]] * len(methods.SEEDS)
        assert [r["run"] for r in entry["runs"]] == [
            c.split("--out ")[1].split()[0] for c in commands
        ]
        for measure, value in methods.RUN_MEASURES.items():
            assert entry["aggregate"][measure] == spread([value(r) for r in entry["runs"]])
    readme = (SHIPPED.parents[1] / "README.md").read_text()
    assert methods_table(result) in readme
    assert contrast_table(method_contrasts(result)) in readme
    assert equal_time_table(result) in readme
    assert contrast_table(equal_time_contrasts(result)) in readme
