"""The command line at the boundary: a bad setting is refused with one line naming the setting,
the value and what is allowed, before any work starts; a run's figures stay in its own folder."""

import hashlib
import json

import pytest
import torch

from cnet.__main__ import main
from cnet.course.figures import repo_root
from cnet.train import PROFILES, SettingError, TrainConfig

REPO_FIGURES = repo_root() / "figures"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "-1"], "steps: -1 is not allowed; expected an integer >= 1"),
        (["--batch_size", "0"], "batch_size: 0 is not allowed; expected an integer >= 1"),
        (["--lr", "nan"], "lr: nan is not allowed; expected a finite number > 0"),
        (
            ["--empty_prompt_ratio", "1.5"],
            "empty_prompt_ratio: 1.5 is not allowed; expected a number from 0 to 1",
        ),
        (["--grad_accum", "0"], "grad_accum: 0 is not allowed; expected an integer >= 1"),
        (["--task", "sketch"], "task: 'sketch' is not allowed; expected one of fill, outline"),
        (["--base", "/nonexistent"], "base: '/nonexistent' is not a diffusers pipeline folder"),
    ],
)
def test_bad_training_settings_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device: 'cuda' is not allowed; expected a device this machine has: auto, cpu" in err


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint.safetensors in" in err
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_unknown_knob_and_a_bad_value(tmp_path, capsys):
    assert main(["compare", "--knob", "speed", "--values", "1"]) == 2
    assert "knob: 'speed' is not a training setting" in capsys.readouterr().err
    assert main(["compare", "--knob", "lr", "--values", "1e-4", "-3"]) == 2
    assert "lr: -3.0 is not allowed; expected a finite number > 0" in capsys.readouterr().err


def test_settings_check_every_field_in_python_too():
    with pytest.raises(SettingError, match="eval_steps: 0 is not allowed"):
        TrainConfig(eval_steps=0).check()
    with pytest.raises(SettingError, match="hint_encoder: 'gaussian' is not allowed"):
        TrainConfig(hint_encoder="gaussian").check()


def _one_error_line(capsys, message):
    """What both command lines print for a refused value: one line, ``error: ...``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_world_pretrain_refuses_a_bad_setting(tmp_path, capsys):
    from cnet.world.__main__ import main as world_main

    assert world_main(["pretrain", "--out", str(tmp_path / "m"), "--vae_steps", "0"]) == 2
    _one_error_line(capsys, "vae_steps: 0 is not allowed; expected an integer >= 1")
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as usage:  # no command: argparse's usage, as python -m cnet
        world_main([])
    assert usage.value.code == 2


def _fingerprint(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_run_writes_its_figures_into_its_own_folder(base, tmp_path, capsys):
    before = _fingerprint(REPO_FIGURES)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--profile",
            "quick",
            "--base",
            str(base),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch_size",
            "2",
            "--train_size",
            "8",
            "--eval_size",
            "2",
            "--eval_every",
            "1",
            "--eval_steps",
            "2",
            "--checkpoint_every",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in (out / "figures").iterdir())
    assert written == [
        "fidelity_and_loss.png",
        "first_steps_gradients.png",
        "samples_over_training.png",
        "zero_conv_growth.png",
    ]
    assert _fingerprint(REPO_FIGURES) == before


def test_a_pretraining_checkpoint_of_the_old_format_is_refused_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from cnet.world.__main__ import main as world_main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_file(
        {"vae.x": torch.zeros(1)},
        str(run_dir / "vae.safetensors"),
        metadata={"meta": '{"step": 2, "elapsed_s": 1.0}'},
    )
    argv = ["pretrain", "--out", str(tmp_path / "m"), "--run_dir", str(run_dir)]
    assert world_main([*argv, "--vae_steps", "4", "--unet_steps", "2"]) == 2
    _one_error_line(capsys, "from an earlier cnet whose format is no longer read")
    assert not (tmp_path / "m").exists()


def test_other_commands_refuse_bad_values_in_one_line(tmp_path, capsys):
    from cnet.world.__main__ import main as world_main

    assert main(["lessons", "--steps", "0"]) == 2
    assert "steps: 0 is not allowed; expected an integer >= 2" in capsys.readouterr().err
    assert world_main(["pretrain", "--out", str(tmp_path / "m"), "--resolution", "30"]) == 2
    _one_error_line(capsys, "resolution: 30 is not allowed")
    assert world_main(["evaluate", "--model", str(tmp_path), "--threads", "0"]) == 2
    _one_error_line(capsys, "threads: 0 is not allowed")
    assert world_main(["evaluate", "--model", str(tmp_path), "--samples", "1"]) == 2
    _one_error_line(capsys, "samples: 1 is not allowed; expected an integer from 2 to 1000")
    assert world_main(["evaluate", "--model", str(tmp_path)]) == 2
    _one_error_line(capsys, f"model: {tmp_path} is not a diffusers pipeline folder")
    assert world_main(["finetune", "--out", str(tmp_path / "f"), "--base", str(tmp_path)]) == 2
    _one_error_line(capsys, f"--base: no diffusers pipeline folder at {tmp_path}")
    assert world_main(["export", "--out", str(tmp_path / "e"), "--samples", "0"]) == 2
    _one_error_line(capsys, "samples: 0 is not allowed; expected an integer >= 1")


def test_evaluate_refuses_bad_values_in_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "samples: 1 is not allowed; expected an integer from 2 to 1000" in err
    assert main(["evaluate", str(tmp_path), "--threads", "0"]) == 2
    assert "threads: 0 is not allowed" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no ControlNetModel in") and err.count("\n") == 1


@pytest.mark.slow
def test_control_writes_notebook_06s_figures_and_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNET_FIGURES", str(tmp_path))
    shipped = repo_root() / "models" / "controlnet-fill"
    assert (
        main(
            [
                "control",
                str(shipped),
                "--samples",
                "2",  # the default: the quick sampler
                "--base",
                str(repo_root() / "models" / "miniature-sd"),
                "--segmentation",
                str(repo_root() / "models" / "controlnet-segmentation"),
                "--fine_tune",
                str(repo_root() / "models" / "miniature-sd-cycled"),
            ]
        )
        == 0
    )
    names = {
        "06_strength",
        "06_strength_samples",
        "06_timing",
        "06_timing_samples",
        "06_residuals_during_sampling",
        "06_prompt_free",
        "06_prompt_free_samples",
        "06_composition",
        "06_transfer",
    }
    assert {p.stem for p in tmp_path.glob("*.png")} == names
    numbers = json.loads((tmp_path / "06_control.json").read_text())
    assert numbers["conditions"] == 2 and len(numbers["strength"]) == 7
    assert [w["start"] for w in numbers["window"]] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75]
    assert len(numbers["residual_rms"]) == 13 and len(numbers["residual_rms"][0]) == 10
    # scale 0 adds nothing: the base alone, the same number
    assert numbers["strength"][0]["iou"] == numbers["base_alone"]["iou"]
    assert [(r["mode"], r["guidance"]) for r in numbers["prompt_free"]][:3] == [
        ("base alone", 3.0),
        ("plain", 3.0),
        ("plain", 7.5),
    ]
    assert len(numbers["prompt_free"]) == 7
    assert [r["composition"] for r in numbers["composition"]][0] == "base alone"
    assert len(numbers["composition"]) == 5 and numbers["composition"][0]["n"] == 2
    assert numbers["transfer"]["fine_tune"] == "miniature-sd-cycled"
    assert [r["model"] for r in numbers["transfer"]["rows"]] == [
        "fine-tune alone",
        "ControlNet unchanged",
        "ControlNet transferred",
    ]
    assert main(["control", str(shipped), "--samples", "1"]) == 2
    assert "samples: 1 is not allowed" in capsys.readouterr().err


@pytest.mark.slow
def test_a_training_run_writes_only_its_own_lines_to_stderr(base, tmp_path):
    """``python -m cnet train`` as a user runs it (a fresh process): on stderr, nothing from
    third-party libraries (no loading bars, no import-time notes), only the run's own progress
    bar; its report on stdout."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(
        [sys.executable, "-m", "cnet", "train", "--base", str(base), "--out",
         str(tmp_path / "run"), "--steps", "2", "--batch_size", "2", "--train_size", "4",
         "--eval_size", "2", "--eval_steps", "1", "--eval_every", "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    strangers = [line for line in lines if not line.startswith("train:")]
    assert not strangers, "\n".join(strangers)
    assert lines and "done: 2 steps" in done.stdout


def test_ablate_summary_writes_figures_only_where_asked(tmp_path, monkeypatch):
    """`python -m cnet ablate --no_train` writes the summary with its claim ledger; figures
    only with --figures, and then beside the summary, never into the shipped figures/."""
    import cnet.bench.suites as suites
    import cnet.course.ablation_plots as plots
    import cnet.course.ablation_report as report

    drawn = []
    monkeypatch.setattr(suites, "variant_cost", lambda *a, **k: {"times_s": []})
    monkeypatch.setattr(report, "first_updates", lambda config: {"updates": []})
    monkeypatch.setattr(report, "summarize", lambda *a, **k: {"variants": {}, "studies": {}})
    monkeypatch.setattr(
        plots, "write_ablation_figures", lambda r, folder: drawn.append(folder) or []
    )
    results = tmp_path / "out" / "ablations.json"
    assert main(["ablate", "--no_train", "--results", str(results)]) in (0, None)
    written = json.loads(results.read_text())
    assert [row["verdict"] for row in written["ledger"]] == ["not run"] * len(written["ledger"])
    assert drawn == []
    assert main(["ablate", "--no_train", "--results", str(results), "--figures"]) in (0, None)
    assert drawn == [results.parent]


def test_ablate_summary_can_take_the_step_times_of_an_earlier_one(tmp_path, monkeypatch, capsys):
    """Re-summarizing finished runs with --step_time_from keeps the earlier summary's measured
    step times instead of timing the step again; a file without them is one line, before
    any work."""
    import cnet.bench.suites as suites
    import cnet.course.ablation_report as report

    def never(*a, **k):
        raise AssertionError("timed again")

    passed = []
    monkeypatch.setattr(suites, "variant_cost", never)
    monkeypatch.setattr(report, "first_updates", lambda config: {"updates": []})
    monkeypatch.setattr(
        report,
        "summarize",
        lambda studies, seeds, root, step_time, *a, **k: (
            passed.append(step_time) or {"variants": {}, "studies": {}}
        ),
    )
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"step_time": {"step_ms": {"default": 337.21}}}))
    results = tmp_path / "ablations.json"
    args = ["ablate", "--no_train", "--results", str(results)]
    assert main([*args, "--step_time_from", str(earlier)]) in (0, None)
    assert passed == [{"step_ms": {"default": 337.21}}]
    assert main([*args, "--step_time_from", str(results)]) == 2  # a summary's, but no step_time
    err = capsys.readouterr().err
    assert f"step_time_from: '{results}' is not allowed; expected an ablation summary" in err


def test_sample_refuses_a_prompt_count_before_loading_anything(tmp_path, capsys):
    # the folder does not exist: the prompt count is checked first, so that is what is named
    argv = ["sample", "--controlnet", str(tmp_path / "none"), "--condition", "a.png", "b.png"]
    assert main([*argv, "--prompt", "x", "y", "z"]) == 2
    _one_error_line(capsys, "prompt: 3 prompts for 2 conditions; expected one prompt, or one per")
    assert main([*argv, "--prompt", "x", "y"]) == 2  # a count that fits: on to the folder
    _one_error_line(capsys, f"no ControlNetModel in {tmp_path / 'none'}")


def test_a_base_is_a_pipeline_folder_or_a_hub_id_by_one_rule(tmp_path, monkeypatch):
    from cnet.settings import is_hub_id
    from cnet.world.model import load_pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    for name in ("models/missing", "./org/name", "/org/name", "a/b/c", "org/", "name"):
        assert not is_hub_id(name), name
    TrainConfig(base="org/name").check()  # the settings accept what the loader would download
    with pytest.raises(SettingError, match="base: 'models/missing' is not a diffusers pipeline"):
        TrainConfig(base="models/missing").check()
    with pytest.raises(FileNotFoundError, match="expected a diffusers pipeline folder"):
        load_pipeline("models/missing")  # a folder that is not there, not a download


def test_evaluate_measures_the_evaluation_conditions_of_the_seed_asked_for(tmp_path, monkeypatch):
    # the conditions a training run of seed s evaluates on are the eval split drawn with s
    import shutil

    import cnet.train.evaluation as evaluation

    shipped = repo_root() / "models" / "controlnet-fill"
    if not shipped.exists():
        pytest.skip("the shipped ControlNet is not in this checkout")
    folder = tmp_path / "controlnet-fill"
    shutil.copytree(shipped, folder)
    asked = []

    def measured(pipe, controlnet, task, samples, steps, guidance, seed=0, style="plain"):
        asked.append((task, samples, steps, guidance, seed))
        return {"task": task}

    monkeypatch.setattr(evaluation, "measure_controlnet", measured)
    argv = ["evaluate", str(folder), "--samples", "32", "--profile", "quick", "--seed", "7"]
    assert main(argv) == 0
    quick = TrainConfig(**PROFILES["quick"])
    assert asked == [("fill", 32, quick.eval_steps, quick.guidance_scale, 7)]
    record = json.loads((folder / "run.json").read_text())["evaluation"]
    assert record["command"] == "python -m cnet " + " ".join(argv) and record["seed"] == 7


def test_evaluate_refuses_a_negative_seed_before_loading_anything(tmp_path, capsys):
    from cnet.world.__main__ import main as world_main

    # the folder does not exist: the seed is checked first, so that is what is named
    assert main(["evaluate", str(tmp_path / "none"), "--seed", "-1"]) == 2
    _one_error_line(capsys, "seed: -1 is not allowed; expected an integer >= 0")
    assert world_main(["evaluate", "--model", str(tmp_path / "none"), "--seed", "-1"]) == 2
    _one_error_line(capsys, "seed: -1 is not allowed; expected an integer >= 0")
