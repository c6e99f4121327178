"""The training recipe: timestep sampling, the collapse alerts and the kept best weights, and
the recipe study's settings and summary."""

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny_unets import tiny_run
from safetensors.torch import load_file

from cnet.experiments.recipe import (
    BUDGET_SAMPLES,
    RECIPES,
    choose,
    recipe_command,
    recipe_config,
    summarize_recipes,
)
from cnet.settings import SettingError
from cnet.train import TrainConfig, draw_batch, train
from cnet.train.convergence import fidelity_collapsed, loss_spiked
from cnet.train.data import draw_timesteps
from cnet.train.runs import export_run, load_controlnet
from cnet.world.data import DEFAULT_RESOLUTION as RES

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------- timestep sampling


def test_uniform_timesteps_are_the_draw_the_loop_always_made():
    # the default keeps every earlier run's batches bit for bit: the same call on the same
    # generator state
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(
        draw_timesteps("uniform", 64, 1000, a), torch.randint(0, 1000, (64,), generator=b)
    )
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))  # same state after


def test_cubic_timesteps_follow_their_distribution():
    # t = floor((1 - u^3) T): P(t < k) = 1 - (1 - k/T)^(1/3); checked on every tenth of the range
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps("cubic", 200_000, 1000, g)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).double() / len(t)
    for k in range(10):
        p = (1 - k / 10) ** (1 / 3) - (1 - (k + 1) / 10) ** (1 / 3)
        sigma = math.sqrt(p * (1 - p) / len(t))
        assert abs(counts[k].item() - p) < 5 * sigma, (k, counts[k].item(), p)
    assert abs((t >= 500).double().mean().item() - 0.5 ** (1 / 3)) < 0.005  # 79 % noisier half


def test_draw_batch_uses_the_configured_timestep_sampling():
    from cnet.train.data import CachedData

    n = 8
    data = CachedData(
        latent_mean=torch.zeros(n, 4, 2, 2),
        latent_std=torch.zeros(n, 4, 2, 2),
        condition=torch.zeros(n, 3, 4, 4),
        prompt_index=torch.ones(n, dtype=int),
        embeddings=torch.zeros(2, 3, 2),
        prompts=["", "p"],
    )
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    cubic = torch.cat(
        [
            draw_batch(data, TrainConfig(batch_size=256, timesteps="cubic"), s, 0, scheduler)[
                "timesteps"
            ]
            for s in range(8)
        ]
    )
    uniform = torch.cat(
        [
            draw_batch(data, TrainConfig(batch_size=256), s, 0, scheduler)["timesteps"]
            for s in range(8)
        ]
    )
    assert (cubic >= 500).double().mean() > 0.75 > 0.55 > (uniform >= 500).double().mean()
    with pytest.raises(
        SettingError, match="timesteps: 'cosine' is not allowed; expected one of uniform, cubic"
    ):
        TrainConfig(timesteps="cosine").check()


# ------------------------------------------------------------------------- collapse detectors


def test_fidelity_collapse_is_a_fall_back_toward_the_base_after_a_rise():
    assert not fidelity_collapsed([0.30])
    assert not fidelity_collapsed([0.30, 0.31, 0.29, 0.30])  # never rose: nothing to lose
    assert not fidelity_collapsed([0.30, 0.62, 0.85, 0.80, 0.84])  # jitter at the top
    assert not fidelity_collapsed([0.30, 0.85, 0.58])  # above half the gain (0.575): held
    assert fidelity_collapsed([0.30, 0.85, 0.57])
    assert fidelity_collapsed([0.30, 0.85, 0.07])  # the shipped collapses fell below the base
    assert not fidelity_collapsed([0.30, 0.39, 0.30])  # a rise of 0.09 is within the jitter


def _collapsed_runs(variant):
    # the curves of the ablation runs made with the quick profile before the recipe study
    # (where it came from: the file's "source")
    kept = json.loads((Path(__file__).parent / "data" / "collapsed_runs.json").read_text())
    return kept["runs"][variant]


def test_real_collapses_are_caught_and_the_healthy_runs_are_not():
    # At 1200 steps of the old quick profile (batch 16, lr 2e-3), seeds 1 and 2 of the default
    # collapsed (loss from ~0.08 to ~1 at steps 908 and 676); seed 0 and every Gaussian run held.
    # The curves keep every fifth logged loss, so 25 entries span 125 steps here.
    for run in _collapsed_runs("default-1200") + _collapsed_runs("gaussian-1200"):
        curves = run["curves"]
        steps, loss = curves["norm_steps"], curves["loss"]
        flagged = [steps[i] for i in range(len(loss)) if loss_spiked(loss[: i + 1])]
        falls = [
            s
            for i, s in enumerate(curves["eval_steps"])
            if fidelity_collapsed(curves["iou"][: i + 1])
        ]
        if run["diverged_at"] is None:
            assert not flagged and not falls, run["run"]
        else:
            assert flagged, run["run"]
            # caught within 100 steps of the divergence, and never before it started
            assert run["diverged_at"] - 125 <= flagged[0] <= run["diverged_at"] + 100


def test_a_loss_spike_needs_history_and_a_doubling():
    steady = [0.08 + 0.01 * math.sin(i) for i in range(100)]
    assert not loss_spiked(steady)
    assert not loss_spiked(steady[:75] + [1.0] * 24)  # only 99 entries: too little history
    assert loss_spiked(steady[:75] + [1.0] * 25)
    assert not loss_spiked(steady + [0.15] * 25)  # below twice the earlier mean
    assert loss_spiked(steady + [0.2] * 25)


# ------------------------------------------------------------------------- the loop's watch


def _config(base, out, **kw):
    settings = tiny_run(base, out=str(out), eval_every=1, checkpoint_every=1, lr=1e-3)
    return TrainConfig(**{**settings, **kw})


def _scripted_evaluations(monkeypatch, values):
    """The loop's evaluation returns these IoUs in turn (step 0 first)."""
    import cnet.train.loop as loop

    scripted = iter(values)

    def evaluate(pipe, controlled, data, steps, guidance):
        return {"iou": next(scripted), "n": 4}, torch.zeros(4, 3, RES, RES)

    monkeypatch.setattr(loop, "evaluate", evaluate)


def _controlnet_weights(path):
    return {k: v for k, v in load_file(path).items() if k.startswith("controlnet.")}


@pytest.mark.slow
def test_a_collapse_is_reported_once_and_the_best_weights_are_kept(
    base, tmp_path, monkeypatch, capsys
):
    # the reference: the same run stopped at step 2, the step whose evaluation is the best
    _scripted_evaluations(monkeypatch, [0.30, 0.60, 0.90])
    train(_config(base, tmp_path / "to-2", steps=2))
    _scripted_evaluations(monkeypatch, [0.30, 0.60, 0.90, 0.35, 0.32])
    summary = train(_config(base, tmp_path / "run"))
    run = tmp_path / "run"
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    alerts = [e for e in entries if "alert" in e]
    assert [e["step"] for e in alerts] == [3]  # once, at the first evaluation that fell
    assert alerts[0]["alert"].startswith(
        "collapse at step 3: iou 0.350, down from its best 0.900 toward the locked base's 0.300"
    )
    assert alerts[0]["alert"] in capsys.readouterr().out  # the line above the progress bar
    assert summary["final_eval"]["iou"] == 0.32
    best = _controlnet_weights(run / "best.safetensors")
    reference = _controlnet_weights(tmp_path / "to-2" / "checkpoint.safetensors")
    assert best.keys() == reference.keys()
    assert all(torch.equal(best[k], reference[k]) for k in best)
    latest = _controlnet_weights(run / "checkpoint.safetensors")
    assert any(not torch.equal(best[k], latest[k]) for k in best)
    # load, ship and sample either
    loaded = load_controlnet(run, "best").state_dict()
    assert all(torch.equal(loaded[k], best["controlnet." + k]) for k in loaded)
    shipped = export_run(run, tmp_path / "shipped", weights="best")
    record = json.loads((shipped / "run.json").read_text())
    assert record["shipped_weights"] == {"weights": "best", "step": 2, "iou": 0.9}
    from diffusers import ControlNetModel

    from cnet.convert import from_diffusers

    model = from_diffusers(ControlNetModel.from_pretrained(shipped / "controlnet"))
    assert all(torch.equal(v, best["controlnet." + k]) for k, v in model.state_dict().items())
    with pytest.raises(SettingError, match="weights: 'best' is not allowed for .*shipped"):
        load_controlnet(shipped, "best")
    with pytest.raises(
        SettingError, match="weights: 'first' is not allowed; expected latest or best"
    ):
        load_controlnet(run, "first")


@pytest.mark.slow
def test_the_best_survives_a_resume_and_a_later_worse_evaluation(base, tmp_path, monkeypatch):
    _scripted_evaluations(monkeypatch, [0.30, 0.70, 0.90])
    train(_config(base, tmp_path / "run", steps=2))
    # resumed: the step-3 and step-4 evaluations are below the best, which stays step 2's
    _scripted_evaluations(monkeypatch, [0.80, 0.85])
    train(_config(base, tmp_path / "run"))
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "best.safetensors", "pt") as f:
        assert f.metadata()["step"] == "2" and json.loads(f.metadata()["metrics"]) == {"iou": 0.9}
    entries = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"alert"' not in entries  # 0.85 is above half of the gain: no collapse


@pytest.mark.slow
def test_a_resumed_run_keeps_its_alerts_and_reports_a_collapse_once(base, tmp_path, monkeypatch):
    # collapsed at step 3, where the run stops; resumed, it is still collapsed, and says so
    # no second time: the alert at the checkpoint's step stays in the log and in the watch
    _scripted_evaluations(monkeypatch, [0.30, 0.90, 0.85, 0.35])
    train(_config(base, tmp_path / "run", steps=3))
    _scripted_evaluations(monkeypatch, [0.32, 0.31])
    train(_config(base, tmp_path / "run", steps=5))
    entries = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert [(e["step"], e["kind"]) for e in entries if "alert" in e] == [(3, "collapse")]
    assert [e["step"] for e in entries if "eval" in e] == [0, 1, 2, 3, 4, 5]


def test_a_checkpoint_from_before_a_setting_existed_resumes_only_with_its_default(tmp_path):
    from cnet.checkpoints import check_resumable, save_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    old = {"lr": 2e-3, "steps": 400}  # written before `timesteps` was a setting
    save_checkpoint(path, {"m": torch.nn.Linear(2, 2)}, None, 100, old)
    defaults = {"lr": 1e-3, "steps": 600, "timesteps": "uniform"}
    check_resumable(path, {**old, "timesteps": "uniform"}, 400, ("steps",), defaults)
    with pytest.raises(SettingError, match="timesteps: 'uniform' there, 'cubic' now"):
        check_resumable(path, {**old, "timesteps": "cubic"}, 400, ("steps",), defaults)


def test_a_loss_spike_is_reported(base, tmp_path, monkeypatch, capsys):
    import cnet.train.loop as loop
    import cnet.train.watch as watch

    # the detector's own window is 25 logged steps (tested above); a window of 2 shows the
    # loop's wiring in 10 steps
    monkeypatch.setattr(watch, "LOSS_WINDOW", 2)
    real, calls = loop.diffusion_loss, []

    def spiking(*args, **kwargs):  # the real loss for 8 steps, then ten times it and more
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss if len(calls) <= 8 else loss * 10 + 1

    monkeypatch.setattr(loop, "diffusion_loss", spiking)
    train(
        _config(
            base,
            tmp_path / "run",
            steps=11,
            eval_every=0,
            checkpoint_every=1000,
            batch_size=1,
            train_size=4,
        )
    )
    entries = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    alerts = [e for e in entries if "alert" in e]
    # steps 0-7 are the real loss; the first 2-step window with a spiked loss (steps 7-8)
    # already averages over twice the earlier mean: reported after update 9, once
    assert [e["step"] for e in alerts] == [9]
    assert alerts[0]["kind"] == "loss"
    assert alerts[0]["alert"].startswith("loss spike at step 9: the last 2 logged losses average")
    # the same line above the progress bar, whose postfix names the alert from then on
    out, err = capsys.readouterr()
    assert alerts[0]["alert"] in out.splitlines()
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("train: 100%") and "11/11" in final and final.endswith("alert=loss]")


# ------------------------------------------------------------------------- the study


def test_every_recipe_gets_the_study_budget_or_its_own_and_its_continuation_is_a_resume():
    for recipe in RECIPES:
        config = recipe_config(recipe, 3, "r")
        longer = recipe_config(recipe, 3, "r", continued=True)
        budget = RECIPES[recipe].get("steps", BUDGET_SAMPLES // config.batch_size)
        assert config.steps == budget and budget * config.batch_size >= BUDGET_SAMPLES
        assert longer.steps == 2 * config.steps and config.seed == longer.seed == 3
        from dataclasses import asdict

        from cnet.train.loop import RESUMABLE_CHANGES

        differ = {k for k, v in asdict(config).items() if asdict(longer)[k] != v}
        assert differ == {"steps", "out"} and differ <= set(RESUMABLE_CHANGES)
    # the quick profile is this recipe, so its command names only the folder and the seed; the
    # others name what differs from it
    chosen = "b32-800-lr4e-3-copy1e-3-cubic-decay300-clip0.1-cl"
    assert recipe_command(chosen, 5, "r") == (
        f"python -m cnet train --profile quick --out r/{chosen}/seed5 --seed 5"
    )
    assert recipe_command("b16-lr2e-3", 5, "r") == (  # 800 steps of 16: the profile's steps
        "python -m cnet train --profile quick --out r/b16-lr2e-3/seed5 --batch_size 16 "
        "--lr 0.002 --lr_decay_start 0 --lr_decay_steps 100 --copy_lr_scale 1.0 "
        "--max_grad_norm 0.0 --timesteps uniform --seed 5 --channels_last false"
    )
    with pytest.raises(SettingError, match="recipe: 'fast' is not allowed"):
        recipe_config("fast", 0)


def test_the_summary_counts_onsets_and_collapses_per_seed(tmp_path):
    # two finished seeds of one recipe, written as the loop writes them
    recipe = "b32-lr2e-3-cubic"
    curves = {
        0: [0.30, 0.31, 0.60, 0.80, 0.85, 0.86, 0.87, 0.86, 0.88],
        1: [0.28, 0.29, 0.28, 0.27, 0.29, 0.50, 0.80, 0.40, 0.10],
        2: [0.31, 0.30, 0.45, 0.70, 0.80],
    }  # not continued yet
    for seed, iou in curves.items():
        for continued, upto in ((False, 5), (True, 9))[: 2 if seed < 2 else 1]:
            config = recipe_config(recipe, seed, tmp_path, continued)
            out = Path(config.out)
            out.mkdir(parents=True)
            steps = [100 * i for i in range(upto)]
            (out / "log.jsonl").write_text(
                "".join(
                    json.dumps({"step": s, "eval": {"iou": v}}) + "\n"
                    for s, v in zip(steps, iou[:upto])
                )
            )
            (out / "run.json").write_text(
                json.dumps(
                    {
                        "steps": config.steps,
                        "device_name": "cpu, 1 thread(s)",
                        "wall_time_s": 10.0 * (2 if continued else 1),
                    }
                )
            )
    # the budget is 400 steps of 32: evaluations 0-400 are the first run's
    result = summarize_recipes([recipe], [0, 1, 2, 3], tmp_path)
    summary = result["recipes"][recipe]
    assert summary["seeds"] == [0, 1, 2] and summary["n"] == 3  # seed 3 has not run
    assert summary["n_2x"] == 2  # nor has seed 2's continuation
    runs = {r["seed"]: r for r in summary["runs"]}
    assert runs[2]["onset"] == 200 and runs[2]["collapsed_2x"] is None
    runs = {r["seed"]: r for r in summary["runs"]}
    assert runs[0]["onset"] == 200 and runs[1]["onset"] is None  # seed 1: 0.29 at 400 is flat
    assert runs[1]["onset_2x"] == 500
    assert runs[0]["final_iou"] == 0.85 and runs[0]["final_iou_2x"] == 0.88
    assert not runs[0]["collapsed_2x"] and runs[1]["collapsed_2x"]  # 0.10 < 0.9 x 0.80
    assert summary["onsets"] == 2 and summary["collapses_2x"] == 1
    assert summary["final_iou"]["median"] == 0.80  # of 0.85, 0.29, 0.80
    assert summary["final_iou_2x"]["median"] == pytest.approx((0.88 + 0.10) / 2)
    assert result["not_run"] == []


def _finished_runs(root, recipe, curves, continued_seeds=()):
    """Run folders of ``recipe`` as the loop leaves them: a log evaluated every 50 steps and at
    the last, a continuation's also where it was resumed (``curves[seed]``: fidelity as a
    function of the step), and run.json."""
    for seed, fidelity in curves.items():
        for continued in (False, True)[: 2 if seed in continued_seeds else 1]:
            config = recipe_config(recipe, seed, root, continued)
            out = Path(config.out)
            out.mkdir(parents=True)
            first = recipe_config(recipe, seed, root).steps  # a continuation resumes there
            steps = sorted({*range(0, config.steps, 50), first, config.steps})
            (out / "log.jsonl").write_text(
                "".join(
                    json.dumps({"step": k, "eval": {"iou": fidelity(k)}}) + "\n" for k in steps
                )  # fmt: skip
            )
            record = {"steps": config.steps, "device_name": "cpu", "wall_time_s": 1.0}
            (out / "run.json").write_text(json.dumps(record))


def test_a_study_goes_on_from_an_earlier_summary_whose_runs_are_gone(tmp_path, monkeypatch):
    from cnet.experiments.recipe import keep_earlier, read_study, recipe_study

    old, new = "b32-lr2e-3-cubic", "b32-520-lr4e-3-copy1e-3-cubic-decay-clip0.1-cl"
    assert recipe_config(new, 0).steps == 520
    assert recipe_config(new, 0, continued=True).steps == 1040
    flat, rising = (lambda k: 0.3), (lambda k: 0.3 if k < 100 else 0.6 + k / 10_000)
    _finished_runs(tmp_path / "a", old, {0: flat, 1: rising}, continued_seeds=(0, 1))
    earlier = recipe_study([old], [0, 1], tmp_path / "a", train=False, command="first")
    assert earlier["recipes"][old]["onsets"] == 1 and earlier["chosen"]["recipe"] == old
    # the earlier runs are gone; the new recipe ran elsewhere
    _finished_runs(tmp_path / "b", new, {0: rising, 1: rising}, continued_seeds=(0, 1))
    result = recipe_study(
        [old, new], [0, 1], tmp_path / "b", train=False, command="second", earlier=earlier
    )
    assert list(result["recipes"]) == [old, new]  # kept first, whole
    assert result["recipes"][old] == earlier["recipes"][old]
    run = result["recipes"][new]["runs"][0]
    assert run["steps"] == 520 and run["final_iou"] == rising(520) and run["onset"] == 100
    assert run["final_iou_2x"] == rising(1040) and not run["collapsed_2x"]
    assert result["not_run"] == [] and result["earlier_commands"] == ["first"]
    assert result["command"] == "second"
    assert result["chosen"] == {"recipe": new, "settings": RECIPES[new], "steps": 520}
    # under another quick profile, a kept run's commands are the lines that make it then
    import cnet.experiments.recipe as recipe_module

    quick = {**recipe_module.PROFILES["quick"], "timesteps": "uniform"}
    monkeypatch.setitem(recipe_module.PROFILES, "quick", quick)
    again = keep_earlier({"recipes": {}, "not_run": []}, earlier)["recipes"][old]["runs"][1]
    root = tmp_path / "a"
    assert again["commands"] == [recipe_command(old, 1, root), recipe_command(old, 1, root, True)]
    assert "--timesteps cubic" in again["commands"][0]  # the recipe's, now off the profile
    assert "--timesteps" not in earlier["recipes"][old]["runs"][1]["commands"][0]  # left as it was
    monkeypatch.undo()
    # a summary kept twice keeps both commands; a recipe whose settings changed is refused
    twice = keep_earlier({"recipes": {}, "not_run": []}, result)
    assert twice["earlier_commands"] == ["first", "second"]
    remade = keep_earlier({"recipes": {}, "not_run": [], "command": "second"}, result)
    assert remade["earlier_commands"] == ["first"]  # its own command is not an earlier one
    changed = json.loads(json.dumps(earlier))
    changed["recipes"][old]["settings"]["lr"] = 1e-3
    with pytest.raises(SettingError, match=f"earlier: recipe '{old}' was measured with"):
        keep_earlier({"recipes": {}, "not_run": []}, changed)
    # refused before any training, as is a summary measured under another onset margin
    ruled = json.loads(json.dumps(earlier)) | {"onset_margin": 0.1}
    for bad in (changed, ruled):
        with pytest.raises(SettingError, match="earlier: "):
            recipe_study([new], [0], tmp_path / "c", earlier=bad)  # train=True: it would train
    assert not (tmp_path / "c").exists()
    (tmp_path / "study.json").write_text(json.dumps(result))
    assert read_study(tmp_path / "study.json") == result
    for bad in (tmp_path / "missing.json", tmp_path / "b" / new / "seed0" / "run.json"):
        with pytest.raises(SettingError, match="earlier: .* is not allowed; expected a recipe"):
            read_study(bad)


# ------------------------------------------------------------------------- the schedule


def test_the_learning_rate_schedule_by_step():
    from cnet.train.optim import lr_factor

    constant = TrainConfig()
    assert {lr_factor(constant, s) for s in range(0, 5000, 7)} == {1.0}
    decay = TrainConfig(lr_decay_start=300, lr_decay_steps=100, lr_min_share=0.1)
    assert [lr_factor(decay, s) for s in (0, 299, 300, 350, 400, 10_000)] == pytest.approx(
        [1, 1, 1, 0.55, 0.1, 0.1]
    )


def test_the_schedule_placed_at_a_resumed_step_sets_that_steps_rate_in_every_group():
    from cnet.train.optim import lr_factor, make_schedule

    config = TrainConfig(lr=4e-3, lr_decay_start=2, lr_decay_steps=4, lr_min_share=0.25)
    for start in (0, 3):
        weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
        groups = [{"params": weights[:1], "lr": 1e-3}, {"params": weights[1:], "lr": 4e-3}]
        optimizer = torch.optim.AdamW(groups)
        schedule = make_schedule(optimizer, config, start)
        for step in range(start, start + 4):  # the rate of update `step`, then the next
            factor = lr_factor(config, step)
            got = [g["lr"] for g in optimizer.param_groups]
            assert got == pytest.approx([1e-3 * factor, 4e-3 * factor], rel=1e-12), step
            optimizer.step()
            schedule.step()


@pytest.mark.slow
def test_a_decaying_run_resumed_equals_the_uninterrupted_one(base, tmp_path):
    from cnet.train.loop import Trainer

    decay = dict(
        lr_decay_start=2, lr_decay_steps=2, lr_min_share=0.25, eval_every=0, checkpoint_every=2
    )
    train(_config(base, tmp_path / "straight", steps=5, **decay))
    train(_config(base, tmp_path / "resumed", steps=3, **decay))
    trainer = Trainer(_config(base, tmp_path / "resumed", steps=5, **decay))
    assert trainer.start == 3
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-3 * 0.625])
    train(_config(base, tmp_path / "resumed", steps=5, **decay))
    a = load_file(tmp_path / "straight" / "checkpoint.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- what ships


SHIPPED_STUDY = ROOT / "figures" / "recipe_study.json"


def test_the_quick_profile_is_the_studys_choice():
    from cnet.train.config import PROFILES

    study = json.loads(SHIPPED_STUDY.read_text())
    # the choice is the rule applied to the shipped numbers, and the profile is that choice
    assert choose(study) == study["chosen"]["recipe"]
    assert study["chosen"]["settings"] == RECIPES[study["chosen"]["recipe"]]
    quick = TrainConfig(**PROFILES["quick"])
    expected = recipe_config(study["chosen"]["recipe"], 0)
    for name in ["steps", "grad_accum", *study["chosen"]["settings"]]:
        assert getattr(quick, name) == getattr(expected, name), name
    assert quick.steps == study["chosen"]["steps"]
    # the check trained that same recipe (first; earlier choices checked there follow)
    assert list(study["check"]["recipes"])[0] == study["chosen"]["recipe"]


def test_the_readme_quotes_the_shipped_study():
    from cnet.course.recipe_report import recipe_table

    assert recipe_table(json.loads(SHIPPED_STUDY.read_text())) in (ROOT / "README.md").read_text()


def test_the_choice_needs_a_continuation_and_counts_the_checks_seeds():
    def recipe(onsets, n, collapses, n_2x, median):
        return {"onsets": onsets, "n": n, "collapses_2x": collapses, "n_2x": n_2x,
                "final_iou": {"median": median}}  # fmt: skip

    study = {
        "recipes": {
            "steady": recipe(5, 5, 0, 5, 0.79),
            "decaying": recipe(5, 5, 0, 5, 0.82),
            "unknown": recipe(5, 5, 0, 0, 0.90),  # never continued: its collapses are unknown
            "rare": recipe(2, 5, 0, 5, 0.95),
        }
    }
    assert choose(study) == "decaying"  # equal onsets and collapses: the higher median
    # the check on more seeds: one more miss for the decaying recipe
    study["check"] = {"recipes": {"steady": recipe(9, 10, 0, 9, 0.69),
                                  "decaying": recipe(8, 10, 0, 0, 0.73)}}  # fmt: skip
    assert choose(study) == "steady"  # 14 of 15 seeds against 13 of 15
    study["recipes"]["steady"]["collapses_2x"] = 1
    study["check"]["recipes"]["decaying"]["onsets"] = 9  # 14 of 15 too
    assert choose(study) == "decaying"  # then the fewer collapses
    # a recipe continued only on the check's seeds is eligible; its onsets count over both parts
    study["recipes"]["late"] = recipe(3, 3, 0, 0, 0.80)
    study["check"]["recipes"]["late"] = recipe(10, 10, 0, 10, 0.83)
    assert choose(study) == "late"  # 13 of 13
    study["check"]["recipes"]["late"]["onsets"] = 9
    assert choose(study) == "decaying"  # 12 of 13 against 14 of 15


# ------------------------------------------------------------------------- a profile as it stands


def test_a_profile_check_runs_the_profile_as_train_makes_it(monkeypatch):
    from dataclasses import asdict

    from cnet.__main__ import _parser, _train_settings
    from cnet.experiments.profiles import profile_command, profile_config
    from cnet.train.loop import RESUMABLE_CHANGES

    monkeypatch.chdir(ROOT)  # the settings' base is relative to the clone
    for continued in (False, True):
        config = profile_config("full", 3, "r", continued)
        argv = profile_command("full", 3, "r", continued).split()[3:]
        _, parsed = _train_settings(_parser().parse_args(argv), "full")
        assert parsed == config
    first, longer = profile_config("full", 3, "r"), profile_config("full", 3, "r", True)
    assert (first.steps, longer.steps) == (3000, 6000) and first.lr_decay_start == 0
    differ = {k for k, v in asdict(first).items() if asdict(longer)[k] != v}
    assert differ == {"steps", "out"} and differ <= set(RESUMABLE_CHANGES)
    with pytest.raises(SettingError) as refused:
        profile_config("fast", 0)
    assert str(refused.value) == "profile: 'fast' is not allowed; expected one of quick, full"


def test_a_profile_check_reads_a_seed_run_at_2x_from_scratch_as_its_budget_and_continuation(
    tmp_path, monkeypatch
):
    import cnet.experiments.recipe as recipe_module
    from cnet.experiments.profiles import profile_check, profile_config

    tiny = {"steps": 400, "eval_every": 100}
    monkeypatch.setitem(recipe_module.PROFILES, "full", tiny)
    curve = [0.30, 0.31, 0.60, 0.80, 0.85, 0.86, 0.87, 0.86, 0.88]
    # seed 0: to the budget, then continued (a copy resumed); seed 1: only 2x, from scratch
    # (the same updates); seed 2: not run
    for seed, continued in ((0, False), (0, True), (1, True)):
        config = profile_config("full", seed, tmp_path, continued)
        out = Path(config.out)
        out.mkdir(parents=True)
        upto = config.steps // 100 + 1
        (out / "log.jsonl").write_text(
            "".join(
                json.dumps({"step": 100 * i, "eval": {"iou": v}}) + "\n"
                for i, v in enumerate(curve[:upto])
            )
        )
        record = {"steps": config.steps, "device_name": "cpu", "wall_time_s": 5.0 * upto}
        (out / "run.json").write_text(json.dumps(record))
    result = profile_check("full", [0, 1, 2], tmp_path, train_runs=False, command="c")
    assert result["not_run"] == [2] and result["seeds"] == [0, 1] and result["profile"] == "full"
    a, b = result["runs"]
    same = ("onset", "final_iou", "best_iou", "onset_2x", "final_iou_2x", "collapsed_2x")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert a["onset"] == 200 and a["final_iou"] == 0.85 and a["final_iou_2x"] == 0.88
    assert (a["wall_time_s"], b["wall_time_s"]) == (25.0, None)  # seed 1 has no budget run
    assert len(a["commands"]) == 2 and len(b["commands"]) == 1
    assert result["onsets"] == 2 and result["n_2x"] == 2 and result["collapses_2x"] == 0
    assert result["wall_time_s"]["median"] == 25.0
    from cnet.course.recipe_report import profile_table

    row = profile_table(result).splitlines()[-1]
    assert row == (
        "| full profile | 400 | seeds 0–1, cpu | 2/2 | 200 | 0.8500 (0.85–0.85) | 0/2 "
        "| 0.88 (0.88–0.88) | 25 |"
    )
    from cnet.course.training_plots import plot_profile_check

    ax = plot_profile_check(result).axes[0]
    assert ax.get_title() == "full profile, seeds 0–1\nonset 2/2, collapsed at 2× 0/2"
    assert ax.get_ylabel() == "IoU (32 evaluation conditions)"  # the default eval_size
    curves = [line for line in ax.lines if line.get_label().startswith("seed")]
    assert [list(line.get_ydata()) for line in curves] == [a["iou"], b["iou"]]
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert [(d.get_xdata()[0], d.get_ydata()[0]) for d in dots] == [(200, a["iou"][2])] * 2


SHIPPED_FULL_CHECK = ROOT / "figures" / "full_check.json"


def test_the_shipped_full_profile_check_starts_and_holds_on_every_seed_and_the_readme_quotes_it():
    """figures/full_check.json, the full profile over five seeds: onset on each within its
    3000 updates, none collapsed at 6000 (final IoU at least 0.9 x its best), each run made by
    the line it records; README.md shows its table."""
    from cnet.course.recipe_report import profile_table
    from cnet.experiments.profiles import PROFILE_CHECK_SEEDS, profile_command
    from cnet.experiments.recipe import COLLAPSE_SHARE

    check = json.loads(SHIPPED_FULL_CHECK.read_text())
    assert check["profile"] == "full" and check["seeds"] == list(PROFILE_CHECK_SEEDS)
    assert check["not_run"] == [] and check["onsets"] == check["n"] == 5
    assert check["n_2x"] == 5 and check["collapses_2x"] == 0
    for run in check["runs"]:
        assert run["onset"] is not None and run["onset"] <= 3000
        assert run["final_iou_2x"] >= COLLAPSE_SHARE * run["best_iou_2x"]
        assert not run["collapsed_2x"]
        longer = profile_command("full", run["seed"], "runs/full-check", continued=True)
        assert run["commands"][-1] == longer  # the README's command, its --root
    assert profile_table(check) in (ROOT / "README.md").read_text()


def test_the_profile_check_command_keeps_its_runs_apart_and_trains_onsets_first(
    tmp_path, monkeypatch, capsys
):
    import cnet.experiments.profiles as profiles
    from cnet.__main__ import main

    monkeypatch.chdir(tmp_path)  # the defaults are relative: runs/full-check, not runs/recipe
    trained = []

    def fake_train(config, profile=None):  # a finished run, as the loop leaves one
        trained.append(config.out)
        Path(config.out).mkdir(parents=True, exist_ok=True)
        record = {"steps": config.steps, "device_name": "cpu", "wall_time_s": 1.0}
        (Path(config.out) / "run.json").write_text(json.dumps(record))
        log = [
            {"step": k, "eval": {"iou": 0.3 + 0.5 * (k > 1000)}}
            for k in range(0, config.steps + 1, 500)
        ]
        (Path(config.out) / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))

    monkeypatch.setattr(profiles, "train", fake_train)
    Path("runs/full-check/seed0-2x.tmp").mkdir(parents=True)  # an interrupted copy's stage
    Path("runs/full-check/seed1-2x").mkdir(parents=True)  # a 2x run begun from scratch
    assert main(["recipe", "--profile", "full", "--seeds", "0", "1"]) == 0
    # every seed's budget first (not seed 1's: its 2x run holds it), then the continuations
    assert trained == [
        "runs/full-check/seed0", "runs/full-check/seed0-2x", "runs/full-check/seed1-2x"
    ]  # fmt: skip
    assert not Path("runs/full-check/seed0-2x.tmp").exists() and not Path("runs/recipe").exists()
    result = json.loads(Path("runs/full-check/full_study.json").read_text())
    assert result["seeds"] == [0, 1] and result["onsets"] == 2 and result["n_2x"] == 2
    assert "out" not in result["settings"] and result["command"].endswith("--seeds 0 1")
    assert main(["recipe", "--profile", "full", "--recipes", "b16-lr2e-3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: profile: 'full' takes no --recipes/check/earlier"
    )
