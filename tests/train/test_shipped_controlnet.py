"""The shipped trained ControlNet (models/controlnet-fill, the full profile's run on the shipped
miniature base): it loads in diffusers and in cnet with the same numbers, it follows its
condition far better than an untrained one, and its shipped log holds the fidelity jump."""

import json

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import ControlNetModel
from safetensors.torch import load_file

from cnet import ControlNet
from cnet.course.figures import repo_root
from cnet.train import (
    TrainConfig,
    cache_data,
    export_run,
    load_base,
    load_checkpoint,
    load_controlnet,
    read_log,
    train,
)
from cnet.train.convergence import detect_sudden_convergence

SHIPPED = repo_root() / "models" / "controlnet-fill"
BASE = repo_root() / "models" / "miniature-sd"


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return load_base(BASE)


def test_shipped_folder_is_a_diffusers_controlnet_with_its_run():
    model = ControlNetModel.from_pretrained(SHIPPED / "controlnet")
    assert model.config.conditioning_embedding_out_channels
    for name in ("log.jsonl", "config.json", "run.json", "samples.safetensors"):
        assert (SHIPPED / name).is_file(), name
    assert not list(SHIPPED.rglob("*.bin")) and not list(SHIPPED.rglob("*.pt*"))
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 20e6, f"shipped ControlNet folder is {size / 1e6:.1f} MB"


def test_diffusers_default_controlnet_runs_on_the_base_in_its_pipeline(base):
    """What diffusers' own training script builds, ControlNetModel.from_unet(unet) with no
    arguments, fits the shipped base as it fits SD1.5: SD1.5's condition encoder (16, 32, 96,
    256; 8x) on 64 px conditions, inside StableDiffusionControlNetPipeline; cnet's default
    ControlNet is the same network."""
    from diffusers import StableDiffusionControlNetPipeline

    from cnet import to_diffusers

    theirs = ControlNetModel.from_unet(base.unet)
    assert tuple(theirs.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    ours = to_diffusers(ControlNet.from_unet(base.unet))
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (ours, theirs)]
    assert public[0] == public[1]
    resolution = base.unet.config.sample_size * base.vae_scale_factor
    assert resolution == 64 and base.vae_scale_factor == 8
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=theirs)
    pipe.set_progress_bar_config(disable=True)
    condition = cache_data(base, "fill", 1, "eval", seed=0).condition
    image = pipe(
        "red circle with blue background",
        image=condition,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_diffusers_and_cnet_give_the_same_residuals(base):
    ours = load_controlnet(SHIPPED)
    theirs = ControlNetModel.from_pretrained(SHIPPED / "controlnet").eval()
    data = cache_data(base, "fill", 2, "eval", seed=0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        a = ours(latents, t, data.embeddings[data.prompt_index[:2]], data.condition[:2])
        down, mid = theirs(
            latents,
            t,
            data.embeddings[data.prompt_index[:2]],
            data.condition[:2],
            return_dict=False,
        )
    assert len(a.down) == len(down) == 12
    for x, y in zip(a.down, down, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.mid, mid, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_trained_controlnet_follows_its_condition_better_than_the_base(base, tmp_path, capsys):
    """`python -m cnet evaluate`: the ControlNet, the base alone and the VAE's ceiling on the same
    evaluation conditions, recorded in the folder's run.json."""
    import shutil

    from cnet.__main__ import main

    folder = tmp_path / "controlnet-fill"
    shutil.copytree(SHIPPED, folder)
    assert (
        main(
            [
                "evaluate",
                str(folder),
                "--base",
                str(BASE),
                "--samples",
                "16",
                "--profile",
                "quick",
                "--threads",
                "2",
            ]
        )
        == 0
    )
    measured = json.loads((folder / "run.json").read_text())["evaluation"]
    assert json.loads(capsys.readouterr().out) == measured
    assert measured["samples"] == measured["base"]["n"] == measured["controlnet"]["n"] == 16
    trained, alone, ceiling = (measured[k]["iou"] for k in ("controlnet", "base", "vae_ceiling"))
    assert trained > alone + 0.3 and ceiling > 0.85, measured
    assert measured["controlnet"]["colours_ok"] >= 0.9, measured
    assert measured["command"].startswith("python -m cnet evaluate ")


def test_shipped_log_shows_the_jump_and_matches_its_summary():
    run = json.loads((SHIPPED / "run.json").read_text())
    assert run["profile"] == "full" and run["steps"] == run["config"]["steps"]
    log = read_log(SHIPPED)
    assert log.eval_steps[0] == 0 and log.eval_steps[-1] == run["steps"]
    assert log.eval_iou[-1] == run["final_eval"]["iou"]
    report = detect_sudden_convergence(log.eval_steps, log.eval_iou)
    assert report.converged and 0 < report.step < run["steps"]
    assert report.final > report.baseline + 0.3
    assert log.copy_grad_norm[0] == 0.0 and all(g > 0 for g in log.copy_grad_norm[1:10])
    assert all(w == 0.0 for w in (v[0] for v in log.weight_norm.values()))


@pytest.mark.slow
def test_export_refuses_an_unfinished_run_and_round_trips_a_finished_one(tmp_path):
    path = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(path)
    config = TrainConfig(
        base=str(path),
        out=str(tmp_path / "run"),
        steps=3,
        batch_size=2,
        train_size=8,
        eval_size=2,
        eval_every=3,
        eval_steps=2,
        checkpoint_every=1,
        lr=1e-3,
    )
    train(config)
    shipped = export_run(config.out, tmp_path / "shipped", samples_kept=1)
    trained = load_controlnet(shipped)
    reference = ControlNet.from_unet(load_base(path).unet)
    load_checkpoint(tmp_path / "run" / "checkpoint.safetensors", {"controlnet": reference}, None)
    for (k, v), (k2, v2) in zip(
        reference.state_dict().items(), trained.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2), k
    assert read_log(shipped).eval_iou == read_log(config.out).eval_iou
    assert export_run(config.out, shipped, samples_kept=1) == shipped  # a re-export replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shipped", "tiny-sd"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a shipped run"):
        export_run(config.out, tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "keep me"

    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["steps"] = 5
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="stopped at step 3 of 5"):
        export_run(tmp_path / "run", tmp_path / "other")
    cfg["steps"] = 3
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    halved = export_run(config.out, tmp_path / "half", samples_kept=1, half=True)
    stored = load_file(halved / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    for (k, v), (_, w) in zip(
        trained.state_dict().items(), load_controlnet(halved).state_dict().items(), strict=True
    ):
        assert torch.equal(v.half().float(), w), k


FINE_TUNE = repo_root() / "models" / "miniature-sd-cycled"


def test_shipped_models_stay_small_and_the_fine_tune_is_its_bases_but_for_the_unet():
    total = sum(p.stat().st_size for p in (repo_root() / "models").rglob("*") if p.is_file())
    assert total < 46e6, f"models/ holds {total / 1e6:.1f} MB"
    record = json.loads((FINE_TUNE / "finetune.json").read_text())
    assert record["style"] == "cycled" and "--profile full" in record["command"]
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (FINE_TUNE / part).read_bytes() == (BASE / part).read_bytes(), part


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["unchanged", "transferred"])
def test_diffusers_pipeline_on_the_fine_tune_gives_cnets_images_and_numbers(base, rule):
    """Transfer through diffusers' own classes: StableDiffusionControlNetPipeline built from the
    shipped fine-tune folder and a ControlNetModel (the shipped one, or moved by the released
    transfer rule) draws what cnet.sample draws, so the fidelity is the same number."""
    from diffusers import StableDiffusionControlNetPipeline

    from cnet import ControlledUNet, to_diffusers
    from cnet.sample import sample
    from cnet.train.evaluation import fidelity

    fine_tune = load_base(FINE_TUNE)
    controlnet = load_controlnet(SHIPPED)
    if rule == "transferred":
        controlnet = controlnet.transferred(base.unet, fine_tune.unet)
    data = cache_data(fine_tune, "fill", 4, "eval", seed=0, style="cycled")
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        FINE_TUNE,
        controlnet=to_diffusers(controlnet),
        local_files_only=True,
        low_cpu_mem_usage=False,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = (
        pipe(
            data.extras["prompt"],
            image=data.condition,
            num_inference_steps=10,
            guidance_scale=3.0,
            latents=latents.clone(),
            output_type="pt",
        ).images
        * 2
        - 1
    )
    ours = sample(
        fine_tune,
        ControlledUNet(fine_tune.unet, controlnet),
        data.extras["prompt"],
        data.condition,
        num_inference_steps=10,
        guidance_scale=3.0,
        latents=latents.clone(),
    )
    assert (ours - theirs).abs().max() <= 2e-5
    measured = [
        fidelity(
            x, data.extras["foreground"], data.extras["background"], data.extras["region"], "cycled"
        )
        for x in (ours, theirs)
    ]
    assert torch.equal(measured[0]["iou"], measured[1]["iou"])


@pytest.mark.slow
def test_control_explorer_resamples_live_and_scale_zero_is_the_base(base):
    from cnet import ControlledUNet
    from cnet.course.widgets import ControlExplorer
    from cnet.sample import sample

    data = cache_data(base, "fill", 3, "eval", seed=0)
    explorer = ControlExplorer(
        base, ControlledUNet(base.unet, load_controlnet(SHIPPED)).eval(), data, steps=10
    )
    controlled_iou, image = explorer.iou, explorer.image.value
    assert len(image) > 1000 and "IoU with the requested disc" in explorer.summary.value
    explorer.scale.value = 0.0
    alone = sample(
        base,
        None,
        data.extras["prompt"][:1],
        num_inference_steps=10,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(explorer.sample, alone)  # scale 0: the locked base, bit for bit
    assert explorer.iou < controlled_iou and explorer.image.value != image
    explorer.condition.value = 2
    assert explorer.summary.value.startswith(f"“{data.extras['prompt'][2]}”")
    explorer.scale.value = 1.0
    whole_window = explorer.sample
    explorer.window.value = (0.75, 1.0)  # control in the last quarter of the steps only
    assert not torch.equal(explorer.sample, whole_window)
    last_quarter, drawn = explorer.sample, explorer.image.value
    assert explorer.window_readout.value == "steps 9–10 of 10 controlled"
    explorer.window.value = (0.5, 0.55)  # no sampling step inside: said plainly, not sampled
    assert "The window 0.50–0.55 holds no sampling step" in explorer.summary.value
    assert explorer.window_readout.value == "no step of 10 controlled"
    assert explorer.sample is last_quarter
    assert explorer.image.value != drawn  # the last picture, faded: marked as not current
    assert not torch.equal(
        explorer.sample,
        sample(
            base,
            None,
            data.extras["prompt"][2:3],
            num_inference_steps=10,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
        ),
    )


def test_the_loss_windows_the_course_quotes_are_the_shipped_logs():
    """What the README and notebook 05 say the loss did around the jump, recomputed from the
    shipped run's log: the mean loss over each quoted window of steps."""
    import json
    import statistics

    log = [json.loads(line) for line in (SHIPPED / "log.jsonl").read_text().splitlines()]
    loss = {row["step"]: row["loss"] for row in log if "loss" in row}

    def mean(first: int, last: int) -> str:
        return f"{statistics.mean(v for s, v in loss.items() if first <= s <= last):.3f}"

    before, after = mean(100, 700), mean(1000, 2000)  # the jump is between steps 700 and 900
    drop = 1 - float(after) / float(before)
    readme = (repo_root() / "README.md").read_text()
    notebook = (repo_root() / "notebooks" / "05_training_a_controlnet.ipynb").read_text()
    for text in (readme, notebook):
        assert f"{before} over steps 100–700" in text and f"{after} over steps 1000–2000" in text
        assert f"({drop:.0%} lower" in text.replace(" %", "%")
    early = {w: mean(*w) for w in ((0, 10), (100, 200))}
    assert f"{early[(0, 10)]} over steps 0–10" in notebook
    assert f"{early[(100, 200)]} over steps 100–200" in notebook
