"""The ControlNet training loop on a small random base: the first-step gradient facts, a loss
that goes down, exact resume, and the failure modes (NaN, Ctrl-C)."""

import dataclasses
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny_unets import tiny_run
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cnet import ControlledUNet, ControlNet
from cnet.checkpoints import checkpoint_wall_time
from cnet.course.figures import write_run_figures
from cnet.train import (
    SettingError,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    cache_data,
    diffusion_loss,
    draw_batch,
    fidelity,
    load_base,
    load_controlnet,
    task_dataset,
    train,
    zero_conv_norms,
)
from cnet.train.data import CachedData
from cnet.train.evaluation import evaluate
from cnet.train.models import build_trained, controlled_by
from cnet.world.data import DEFAULT_RESOLUTION as RES
from cnet.world.data import FillDataset, ShapesDataset


def load_file_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _config(base, out, **kw):
    settings = tiny_run(base, out=str(out), eval_every=0, checkpoint_every=2, lr=1e-3)
    return TrainConfig(**{**settings, **kw})


def test_first_step_zero_gradient_to_the_copy_then_nonzero(base):
    pipe = load_base(base)
    controlnet = ControlNet.from_unet(pipe.unet)
    controlled = ControlledUNet(pipe.unet, controlnet).train()
    data = cache_data(pipe, "fill", 8, "train", seed=0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    config = TrainConfig(batch_size=4)

    def step(k):
        optimizer.zero_grad(set_to_none=False)
        batch = draw_batch(data, config, k, 0, scheduler, torch.device("cpu"))
        diffusion_loss(controlled, batch, scheduler, pipe.vae.config.scaling_factor).backward()
        return zero_conv_norms(controlnet, grads=True)

    grads = step(0)
    residual_convs = [k for k in grads if k != "zero_conv.hint"]
    assert len(residual_convs) == 13
    assert all(grads[k] > 0 for k in residual_convs)  # Θ_z2 learns at once (Eq. 6)
    assert grads["zero_conv.hint"] == 0.0  # behind the copy: cut off (∂Z/∂I = W = 0)
    for p in controlnet.theta_c_parameters() + list(controlnet.hint_encoder.parameters()):
        assert torch.count_nonzero(p.grad) == 0
    assert all(p.grad is None for p in pipe.unet.parameters())  # locked base
    optimizer.step()

    grads = step(1)  # W_z2 != 0 now (Eq. 7), so gradients reach Θ_c and E (Eq. 8)
    assert grads["zero_conv.hint"] > 0
    assert sum(torch.count_nonzero(p.grad) for p in controlnet.theta_c_parameters()) > 0


@pytest.mark.slow
def test_loss_decreases_on_a_short_cpu_run(base):
    torch.manual_seed(0)
    pipe = load_base(base)
    controlnet = ControlNet.from_unet(pipe.unet)
    controlled = ControlledUNet(pipe.unet, controlnet).train()
    data = cache_data(pipe, "fill", 8, "train", seed=0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    fixed = draw_batch(
        data,
        TrainConfig(batch_size=4, empty_prompt_ratio=0.0),
        0,
        0,
        scheduler,
        torch.device("cpu"),
    )
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=2e-3)
    scaling = pipe.vae.config.scaling_factor
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = diffusion_loss(controlled, fixed, scheduler, scaling)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _weights(path):
    return load_file(path / "checkpoint.safetensors")


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run(base, tmp_path, monkeypatch):
    train(_config(base, tmp_path / "straight", eval_every=2))
    first = train(_config(base, tmp_path / "resumed", steps=2, eval_every=2))
    ckpt = tmp_path / "resumed" / "checkpoint.safetensors"
    # the checkpoint records the time up to its own saving, a little less than the summary's
    # (which is rounded to 0.1 s, hence the 0.05); the resumed run adds its time to the first's
    at_step_2 = checkpoint_wall_time(ckpt)
    assert 0 < at_step_2 <= first["wall_time_s"] + 0.05
    summary = train(_config(base, tmp_path / "resumed", eval_every=2))
    assert summary["resumed_from"] == 2
    assert at_step_2 < checkpoint_wall_time(ckpt) <= summary["wall_time_s"] + 0.05
    config_json = (tmp_path / "resumed" / "config.json").read_text()
    assert train(_config(base, tmp_path / "resumed", eval_every=2)) == summary  # finished: kept
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.001 there, 0.0005 now\)"):
        train(_config(base, tmp_path / "resumed", eval_every=2, lr=5e-4, steps=6))
    with pytest.raises(ValueError, match="at step 4, beyond the requested 3 steps"):
        train(_config(base, tmp_path / "resumed", eval_every=2, steps=3))
    assert (tmp_path / "resumed" / "config.json").read_text() == config_json
    # the wall time adds up over the resume; the weights carry no trace of it
    assert summary["wall_time_s"] == pytest.approx(
        at_step_2 + summary["wall_time_this_invocation_s"], abs=0.11
    )
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = (tmp_path / "straight" / "log.jsonl").read_text()
    assert log_a == (tmp_path / "resumed" / "log.jsonl").read_text()
    samples = load_file(tmp_path / "resumed" / "samples.safetensors")
    assert sorted(samples) == ["step_0", "step_2", "step_4"]
    assert samples["step_4"].dtype == torch.uint8 and samples["step_4"].shape == (4, 3, RES, RES)

    written = write_run_figures(tmp_path / "resumed", prefix="t_")
    assert {p.parent for p in written} == {tmp_path / "resumed" / "figures"}
    assert sorted(p.name for p in written) == sorted(
        f"t_{n}.png"
        for n in (
            "fidelity_and_loss",
            "zero_conv_growth",
            "first_steps_gradients",
            "samples_over_training",
        )
    )
    assert all(p.stat().st_size > 5000 for p in written)


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues_exactly(base, tmp_path):
    def interrupt_at_step_1(entry):
        if entry.get("step") == 1 and "loss" in entry:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(base, tmp_path / "cut", checkpoint_every=100), on_log=interrupt_at_step_1)
    assert json.loads((tmp_path / "cut" / "log.jsonl").read_text().splitlines()[-1])["step"] == 1
    summary = train(_config(base, tmp_path / "cut"))
    assert summary["resumed_from"] == 2  # steps 0 and 1 had been taken when Ctrl-C came
    train(_config(base, tmp_path / "whole"))
    a, b = _weights(tmp_path / "cut"), _weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    import cnet.train.loop as train_module

    real = train_module.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        train(_config(base, tmp_path / "nan", checkpoint_every=2))
    good = _weights(tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoint.safetensors.tmp").exists()
    monkeypatch.setattr(train_module, "diffusion_loss", real)
    from safetensors import safe_open

    with safe_open(tmp_path / "nan" / "checkpoint.safetensors", "pt") as f:
        assert f.metadata()["step"] == "2"
    assert all(torch.isfinite(v.float()).all() for v in good.values())


def test_unlocked_decoder_trains_only_the_decoder(base, tmp_path):
    before = load_base(base).unet.state_dict()
    train(_config(base, tmp_path / "unlocked", sd_locked=False, steps=2))
    saved = _weights(tmp_path / "unlocked")
    unet_keys = {k[len("unet.") :] for k in saved if k.startswith("unet.")}
    changed = {k for k in unet_keys if not torch.equal(saved["unet." + k], before[k])}
    assert changed and all(
        k.startswith(("up_blocks", "conv_norm_out", "conv_out")) for k in changed
    )
    assert not any(k.startswith(("down_blocks", "mid_block", "conv_in")) for k in changed)


def test_the_optimizers_groups_take_their_rates_and_the_weight_decay(base):
    from cnet.train.optim import make_optimizer

    pipe = load_base(base)
    controlnet = ControlNet.from_unet(pipe.unet)
    config = TrainConfig(lr=2e-3, sd_locked=False, decoder_lr_scale=0.5, weight_decay=0.05)
    optimizer = make_optimizer(controlnet, pipe.unet, config, torch.device("cpu"))
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [2e-3, 1e-3]  # the ControlNet, then the decoder
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05]
    decoder = {id(p) for part in (pipe.unet.up_blocks, pipe.unet.conv_norm_out, pipe.unet.conv_out)
               for p in part.parameters()}  # fmt: skip
    assert {id(p) for p in groups[1]["params"]} == decoder


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown task 'sketch'"):
        task_dataset("sketch", 4, "train", RES, 0)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_base("/nonexistent/folder")


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_shapes_condition_trains_and_is_evaluated(base, tmp_path, task):
    # the shapes world's conditions train through the same loop: 3-channel condition images,
    # fidelity measured against the first shape's region and colour
    pipe = load_base(base)
    data = cache_data(pipe, task, 4, "eval", seed=0)
    # what is cached is the world's own rendering of that condition, and its ground truth
    dataset = ShapesDataset(4, "eval", RES, 0)
    rendered, scenes = dataset.batch(range(4)), dataset.scenes(range(4))
    assert data.condition.shape == (4, 3, RES, RES) and data.condition.amax() > 0
    assert torch.equal(data.condition, rendered[task].float())
    assert torch.equal(data.extras["region"], rendered["layers"] > 0)
    assert torch.equal(data.extras["foreground"], torch.from_numpy(scenes.colour[:, 0]))
    assert torch.equal(data.extras["background"], torch.from_numpy(scenes.background))
    assert data.extras["prompt"] == rendered["prompt"]
    assert [data.prompts[i] for i in data.prompt_index] == rendered["prompt"]
    config = _config(base, tmp_path / task, task=task, steps=2, eval_every=2)
    summary = train(config)
    final = summary["final_eval"]
    # run.json: what ran where, how long, its last evaluation and every setting
    run = json.loads((tmp_path / task / "run.json").read_text())
    assert run == summary
    assert list(run) == [
        "profile", "device", "processes", "mixed_precision", "device_name", "steps",
        "resumed_from", "wall_time_s", "wall_time_this_invocation_s", "final_eval", "config",
    ]  # fmt: skip
    assert (run["profile"], run["device"], run["processes"], run["mixed_precision"]) == (
        "custom", "cpu", 1, "no"
    )  # fmt: skip
    assert run["device_name"] == f"cpu, {torch.get_num_threads()} thread(s)"
    assert (run["steps"], run["resumed_from"]) == (2, 0)
    assert run["wall_time_this_invocation_s"] > 0
    assert run["wall_time_s"] == pytest.approx(run["wall_time_this_invocation_s"], abs=0.11)
    assert run["config"] == dataclasses.asdict(config)
    assert json.loads((tmp_path / task / "config.json").read_text()) == run["config"]
    assert final["n"] == 4
    # the summary's evaluation is the one logged at the last step, and the samples it measured
    # were kept
    lines = [json.loads(line) for line in (tmp_path / task / "log.jsonl").read_text().splitlines()]
    evals = [e for e in lines if "eval" in e]
    assert [e["step"] for e in evals] == [0, 2] and evals[-1]["eval"] == final
    samples = load_file(tmp_path / task / "samples.safetensors")
    assert samples["step_2"].shape == (4, 3, RES, RES)
    # the final evaluation is the fidelity of those samples (kept as 8-bit images) against
    # this evaluation set's regions and colours
    kept = samples["step_2"].float() / 127.5 - 1
    extras = data.extras
    again = fidelity(kept, extras["foreground"], extras["background"], extras["region"])
    assert again["iou"].mean().item() == pytest.approx(final["iou"], abs=0.01)
    assert again["colours_ok"].float().mean().item() == pytest.approx(final["colours_ok"], abs=0.26)


def test_fidelity_of_the_ground_truth_is_perfect_and_a_shifted_region_is_not():
    dataset = FillDataset(16, "eval", RES, 0)
    batch, scenes = dataset.batch(range(16)), dataset.scenes(range(16))
    foreground = torch.from_numpy(scenes.colour[:, 0].copy())
    background = torch.from_numpy(scenes.background.copy())
    region = batch["layers"] > 0
    assert region.any(dim=(1, 2)).all() and (~region).any(dim=(1, 2)).all()
    perfect = fidelity(batch["image"], foreground, background, region)
    assert perfect["iou"].shape == (16,) and perfect["colours_ok"].dtype == torch.bool
    assert torch.equal(perfect["iou"], torch.ones(16))
    assert bool(perfect["colours_ok"].all())
    shifted = fidelity(
        batch["image"], foreground, background, torch.roll(region, shifts=(5, 5), dims=(1, 2))
    )
    assert (shifted["iou"] < 1).all() and shifted["iou"].mean() < 0.9
    # colours_ok judges the image alone, not the region
    assert torch.equal(shifted["colours_ok"], perfect["colours_ok"])
    # the background's colour asked for as the foreground: the disc is not found
    swapped = fidelity(batch["image"], background, foreground, region)
    assert (swapped["iou"] == 0).all() and not swapped["colours_ok"].any()


# ---------------------------------------------------------------- the batch sampler, by hand


def _cached(n=64, prompts=5, latent_std=0.0, seed=0):
    """A CachedData made by hand: sample i's condition is filled with i (so a batch tells
    which samples it drew), every sample has a non-empty prompt (index >= 1), and prompt p's
    embedding is filled with p."""
    g = torch.Generator().manual_seed(seed)
    return CachedData(
        latent_mean=torch.randn(n, 4, 2, 2, generator=g),
        latent_std=torch.full((n, 4, 2, 2), float(latent_std)),
        condition=torch.arange(n, dtype=torch.float32)[:, None, None, None]
        .expand(n, 3, 4, 4)
        .clone(),
        prompt_index=torch.randint(1, prompts, (n,), generator=g),
        embeddings=torch.arange(prompts, dtype=torch.float32)[:, None, None]
        .expand(prompts, 3, 2)
        .clone(),
        prompts=[""] + [f"prompt {p}" for p in range(1, prompts)],
    )


def _drawn(batch):
    """The sample indices a batch drew (read back from the conditions of _cached)."""
    return batch["condition"][:, 0, 0, 0].long()


SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.25, 0.75])
def test_draw_batch_drops_the_prompt_at_the_configured_rate(ratio):
    data = _cached()
    assert (data.prompt_index >= 1).all()
    config = TrainConfig(empty_prompt_ratio=ratio, batch_size=256)
    dropped, total = 0, 0
    for step in range(20):
        batch = draw_batch(data, config, step, 0, SCHEDULER, "cpu")
        index = batch["prompt_index"]
        idx = _drawn(batch)
        assert index.shape == (256,)
        # a kept prompt is the sample's own; a dropped one is the empty prompt
        assert torch.all((index == 0) | (index == data.prompt_index[idx]))
        assert torch.equal(batch["embeddings"], data.embeddings[index])
        assert torch.equal(batch["condition"], data.condition[idx])
        dropped += int((index == 0).sum())
        total += len(index)
    fraction = dropped / total
    if ratio in (0.0, 1.0):
        assert fraction == ratio
    else:
        sigma = math.sqrt(ratio * (1 - ratio) / total)
        assert abs(fraction - ratio) < 5 * sigma, (fraction, ratio, sigma)


def test_draw_batch_timesteps_are_uniform_over_the_whole_schedule():
    data = _cached()
    config = TrainConfig(batch_size=256)
    t = torch.cat(
        [draw_batch(data, config, step, 0, SCHEDULER, "cpu")["timesteps"] for step in range(20)]
    )
    assert not t.is_floating_point()
    assert t.min() >= 0 and t.max() <= 999
    assert t.min() < 20 and t.max() > 980
    sigma = math.sqrt((1000**2 - 1) / 12 / len(t))  # std of the mean of uniform {0..999}
    assert abs(t.double().mean().item() - 499.5) < 4 * sigma
    # every tenth of the range is visited about equally often
    counts = torch.bincount(t // 100, minlength=10)
    assert len(counts) == 10 and counts.min() > 0.8 * len(t) / 10


def test_draw_batch_every_micro_batch_has_its_own_randomness():
    data = _cached(latent_std=1.0)
    config = TrainConfig(grad_accum=3, batch_size=8)
    noises = {
        (step, micro): draw_batch(data, config, step, micro, SCHEDULER, "cpu")["noise"]
        for step in range(5)
        for micro in range(3)
    }
    for (a, na), (b, nb) in itertools.combinations(noises.items(), 2):
        assert not torch.equal(na, nb), (a, b)
    # the same (seed, step, micro) draws the same batch again: the key to exact resume
    again = draw_batch(data, config, 3, 2, SCHEDULER, "cpu")
    assert torch.equal(again["noise"], noises[(3, 2)])
    # without accumulation, every step's single micro-batch is its own too
    single = TrainConfig(grad_accum=1, batch_size=8)
    draws = [draw_batch(data, single, k, 0, SCHEDULER, "cpu") for k in range(10)]
    for a, b in itertools.combinations(range(10), 2):
        assert not torch.equal(draws[a]["noise"], draws[b]["noise"]), (a, b)
        assert not torch.equal(draws[a]["latents"], draws[b]["latents"]), (a, b)
    # and the seed changes the draw
    other_seed = draw_batch(
        data, TrainConfig(grad_accum=1, batch_size=8, seed=1), 0, 0, SCHEDULER, "cpu"
    )
    assert not torch.equal(other_seed["noise"], draws[0]["noise"])


def test_draw_batch_latents_come_from_the_cached_distribution():
    exact = _cached(latent_std=0.0)
    batch = draw_batch(exact, TrainConfig(batch_size=64), 0, 0, SCHEDULER, "cpu")
    idx = _drawn(batch)
    assert len(set(idx.tolist())) > 10  # drawn with replacement from all of the data
    assert torch.equal(batch["latents"], exact.latent_mean[idx])
    # with a spread, the standardised draw is a standard normal one, independent of the noise
    spread = _cached(latent_std=2.0)
    z, noise = [], []
    for step in range(8):
        batch = draw_batch(spread, TrainConfig(batch_size=256), step, 0, SCHEDULER, "cpu")
        idx = _drawn(batch)
        z.append((batch["latents"] - spread.latent_mean[idx]) / spread.latent_std[idx])
        noise.append(batch["noise"])
    z, noise = torch.cat(z).flatten(), torch.cat(noise).flatten()
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    assert abs(noise.std().item() - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([z, noise]))[0, 1].item()) < 0.05


# --------------------------------------------------------------- what the loss feeds the net


class _Spy:
    """Stands in for the controlled U-Net: records its inputs, returns a fixed prediction."""

    def __init__(self, prediction):
        self.prediction = prediction
        self.calls = []

    def __call__(self, sample, timestep, encoder_hidden_states, condition):
        self.calls.append((sample, timestep, encoder_hidden_states, condition))
        return self.prediction


def test_diffusion_loss_feeds_the_noised_scaled_latent_and_regresses_the_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    data = _cached(latent_std=1.0)
    batch = draw_batch(
        data, TrainConfig(batch_size=16, empty_prompt_ratio=0.5), 0, 0, scheduler, "cpu"
    )
    batch["timesteps"][:3] = torch.tensor([0, 500, 999])  # both ends of the schedule too
    prediction = torch.randn(batch["noise"].shape, generator=torch.Generator().manual_seed(1))
    spy = _Spy(prediction)
    scaling = 0.18215
    loss = diffusion_loss(spy, batch, scheduler, scaling)
    assert len(spy.calls) == 1
    sample, timestep, embeddings, condition = spy.calls[0]
    abar = scheduler.alphas_cumprod.double()[batch["timesteps"]][:, None, None, None]
    expected = (
        abar.sqrt() * batch["latents"].double() * scaling
        + (1 - abar).sqrt() * batch["noise"].double()
    )
    assert sample.shape == batch["latents"].shape
    torch.testing.assert_close(sample.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(timestep, batch["timesteps"])
    assert torch.equal(embeddings, batch["embeddings"])
    assert torch.equal(condition, batch["condition"])
    assert loss.shape == () and torch.equal(loss, F.mse_loss(prediction, batch["noise"]))
    # a perfect prediction of the noise costs nothing
    assert diffusion_loss(_Spy(batch["noise"].clone()), batch, scheduler, scaling) == 0


@pytest.mark.parametrize("kind", ["v_prediction", "sample", "flow"])
def test_diffusion_loss_regresses_what_the_base_predicts(kind):
    """SD2's 768 px models predict the velocity sqrt(abar) eps - sqrt(1 - abar) z0; a base
    that predicts the clean latent regresses z0; any other prediction type is refused."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.register_to_config(prediction_type=kind)
    batch = draw_batch(_cached(latent_std=1.0), TrainConfig(batch_size=8), 0, 0, scheduler, "cpu")
    prediction = torch.randn(batch["noise"].shape, generator=torch.Generator().manual_seed(1))
    scaling = 0.18215
    if kind == "flow":
        with pytest.raises(SettingError, match="base: prediction_type 'flow' is not allowed"):
            diffusion_loss(_Spy(prediction), batch, scheduler, scaling)
        return
    z0 = batch["latents"] * scaling
    abar = scheduler.alphas_cumprod[batch["timesteps"]][:, None, None, None]
    velocity = abar.sqrt() * batch["noise"] - (1 - abar).sqrt() * z0
    target = velocity if kind == "v_prediction" else z0
    loss = diffusion_loss(_Spy(prediction), batch, scheduler, scaling)
    torch.testing.assert_close(loss, F.mse_loss(prediction, target), rtol=1e-6, atol=0)
    assert diffusion_loss(_Spy(target.clone()), batch, scheduler, scaling) < 1e-12


# ------------------------------------------------------------------------- what a step averages


def test_accumulated_micro_batches_are_different_and_their_gradients_averaged(base, tmp_path):
    """grad_accum 2: the update's gradient is the mean of the two micro-batches' gradients
    (not their sum), and the micro-batches hold different samples and noise."""
    from cnet.train import Trainer

    config = _config(base, tmp_path / "run", batch_size=2, grad_accum=2, steps=1)
    trainer = Trainer(config)
    trainer.load_data()
    first, second = (
        draw_batch(trainer.data, config, 0, micro, trainer.noise_scheduler) for micro in (0, 1)
    )
    assert not torch.equal(first["latents"], second["latents"])
    assert not torch.equal(first["noise"], second["noise"])
    params = [p for p in trainer.trained.parameters() if p.requires_grad]
    scaling = trainer.pipe.vae.config.scaling_factor
    each = [
        torch.autograd.grad(
            diffusion_loss(trainer.controlled, batch, trainer.noise_scheduler, scaling), params,
            allow_unused=True,
        )
        for batch in (first, second)
    ]  # fmt: skip
    seen = {}

    def keep(step, controlnet):
        seen["step"], seen["grads"] = step, [p.grad.clone() for p in params]

    trainer.on_update = keep
    with torch.no_grad():  # before the update
        losses = [
            diffusion_loss(trainer.controlled, b, trainer.noise_scheduler, scaling).item()
            for b in (first, second)
        ]
    loss, entry = trainer.step(0)
    trainer.close()
    assert seen["step"] == 0 and entry["step"] == 0
    # the logged loss is the micro-batches' mean too
    assert loss == entry["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    checked = 0
    for got, a, b in zip(seen["grads"], *each, strict=True):
        if a is None:
            continue
        mean = (a + b) / 2
        torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-9)
        checked += int(mean.abs().max() > 0)
    assert checked >= 2  # the zero convolutions' gradients at step 0 are not zero


def test_the_first_steps_and_every_log_every_th_are_logged(base, tmp_path):
    """A step returns its log entry (step, loss, norms) where it is logged: each of the first
    FIRST_STEPS_LOGGED, then every log_every-th; None elsewhere."""
    from cnet.train import Trainer
    from cnet.train.loop import FIRST_STEPS_LOGGED

    assert FIRST_STEPS_LOGGED == 10
    trainer = Trainer(_config(base, tmp_path / "run", batch_size=2, log_every=4))
    trainer.load_data()
    entries = {step: trainer.step(step)[1] for step in (9, 10, 12, 13)}
    trainer.close()
    assert [s for s, e in entries.items() if e is not None] == [9, 12]
    assert entries[10] is None and entries[13] is None
    assert entries[9]["step"] == 9 and entries[12]["step"] == 12
    assert {"loss", "weight_norm", "grad_norm", "copy_grad_norm"} <= set(entries[12])
    assert "update_skipped" not in entries[12]  # fp32: no loss scaler, no update skipped


def test_a_run_is_evaluated_on_the_evaluation_split(base, tmp_path):
    from cnet.train import Trainer

    config = _config(base, tmp_path / "run", eval_size=4, train_size=16)
    trainer = Trainer(config)
    trainer.load_data()
    trainer.close()
    trainer.close()  # closing twice is harmless
    evaluation = cache_data(trainer.pipe, "fill", 4, "eval", config.seed)
    training = cache_data(trainer.pipe, "fill", 4, "train", config.seed)
    assert torch.equal(trainer.eval_data.condition, evaluation.condition)
    assert not torch.equal(trainer.eval_data.condition, training.condition)
    assert torch.equal(trainer.data.condition[:4], training.condition)


def test_an_evaluation_samples_the_controlled_unet_and_keeps_its_images(base, tmp_path):
    """Trainer.evaluate: the evaluation set sampled through the ControlNet being trained, with
    the run's sampler; its images kept exactly (8-bit) in samples.safetensors, its metrics logged
    and handed to the watch (which keeps the best weights)."""
    from cnet.train import Trainer
    from cnet.train.evaluation import evaluate

    config = _config(base, tmp_path / "run", eval_size=2, eval_steps=2, guidance_scale=1.5)
    trainer = Trainer(config)
    trainer.load_data()
    trainer.step(0)
    trainer.step(1)  # the zero convolutions have moved: the ControlNet changes the samples
    metrics = trainer.evaluate(2)
    trainer.close()
    trainer.controlled.eval()
    expected, images = evaluate(trainer.pipe, trainer.controlled, trainer.eval_data, 2, 1.5)
    assert metrics == expected
    base_alone = evaluate(trainer.pipe, None, trainer.eval_data, 2, 1.5)[1]
    assert not torch.equal(images, base_alone)
    other_guidance = evaluate(trainer.pipe, trainer.controlled, trainer.eval_data, 2, 3.0)[1]
    assert not torch.equal(images, other_guidance)
    kept = load_file(tmp_path / "run" / "samples.safetensors")
    assert list(kept) == ["step_2"]
    assert kept["step_2"].dtype == torch.uint8
    assert torch.equal(kept["step_2"], ((images + 1) * 127.5).round().to(torch.uint8))
    assert (tmp_path / "run" / "validation" / "step_000002.png").exists()
    assert not list((tmp_path / "run").glob("*.tmp"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1] == {"step": 2, "eval": metrics}
    assert trainer.watch.fidelity == [metrics["iou"]]
    best = json.loads(load_file_metadata(tmp_path / "run" / "best.safetensors")["metrics"])
    assert int(load_file_metadata(tmp_path / "run" / "best.safetensors")["step"]) == 2
    assert best == {"iou": metrics["iou"]}


def test_evaluations_follow_eval_every_and_a_run_resumed_at_its_end_reports_its_last(
    base, tmp_path, capsys
):
    """Evaluated at step 0 and every eval_every-th; a run stopped after its last checkpoint
    but before run.json, run again, trains nothing and reports the last logged evaluation."""
    out = tmp_path / "runs" / "fill" / "run"  # folders made as needed
    config = _config(base, out, steps=2, eval_every=1, eval_size=2, log_every=1)
    entries = []
    summary = train(config, on_log=entries.append)
    log_path = out / "log.jsonl"
    for name, content in [("config.json", dataclasses.asdict(config)), ("run.json", summary)]:
        assert (out / name).read_text() == json.dumps(content, indent=2)
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert entries == log  # on_log sees every entry as written
    assert [e["step"] for e in log if "eval" in e] == [0, 1, 2]
    assert [e["step"] for e in log if "loss" in e] == [0, 1]
    assert summary["final_eval"] == log[-1]["eval"]
    # the progress bar's last state: steps, the last loss and the last evaluation, no alert
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    iou = f"{summary['final_eval']['iou']:.3f}"
    assert bar.startswith("train: 100%") and " 2/2 " in bar
    assert bar.endswith(f"loss={log[-2]['loss']:.4f}, iou={iou}]")
    (out / "run.json").unlink()
    again_entries = []
    again = train(config, on_log=again_entries.append)
    assert again_entries == [] and log_path.read_text().splitlines() == [json.dumps(e) for e in log]
    assert again["resumed_from"] == 2 and again["final_eval"] == summary["final_eval"]
    assert " 2/2 " in capsys.readouterr().err  # the bar starts where the run resumed
    # continued to 3 steps: the samples of steps 0-2 kept as they were, step 3's added
    before = load_file(out / "samples.safetensors")
    longer = dataclasses.replace(config, steps=3)
    third = train(longer)
    after = load_file(out / "samples.safetensors")
    assert sorted(after) == ["step_0", "step_1", "step_2", "step_3"]
    assert all(torch.equal(after[k], before[k]) for k in before)
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [e["step"] for e in log if "eval" in e] == [0, 1, 2, 3]
    assert [e["step"] for e in log if "loss" in e] == [0, 1, 2]
    # a finished run asked again: nothing done, its record returned
    capsys.readouterr()
    assert train(longer) == third
    assert capsys.readouterr().out == f"{out} already finished 3 steps; nothing to do\n"
    # a checkpoint from before a setting existed was trained with its default: changing it
    # on resume is refused as for any other setting
    checkpoint = out / "checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(metadata["config"])
    del saved["copy_lr_scale"]
    save_file(tensors, str(checkpoint), metadata={**metadata, "config": json.dumps(saved)})
    with pytest.raises(SettingError, match="copy_lr_scale: 1.0 there, 0.5 now"):
        train(dataclasses.replace(config, steps=4, copy_lr_scale=0.5))
    # the checkpoint names the ControlNet's weights as export and sample read them
    assert "controlnet.conv_in.weight" in tensors
    # no evaluation at all where eval_every is 0
    quiet = _config(base, tmp_path / "quiet", steps=1, eval_size=2)
    assert train(quiet)["final_eval"] == {}
    assert not any('"eval"' in line for line in (tmp_path / "quiet" / "log.jsonl").open())
    # resumed at step 1, after a crash that left a log entry past the checkpoint: the entry is
    # dropped, and the training time behind the checkpoint (recorded as 12.5 s here) counts in
    # the total
    checkpoint = tmp_path / "quiet" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(checkpoint), metadata={**metadata, "wall_time_s": "12.5"})
    with (tmp_path / "quiet" / "log.jsonl").open("a") as log_file:
        log_file.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    resumed = train(dataclasses.replace(quiet, steps=2))
    assert resumed["resumed_from"] == 1
    assert resumed["wall_time_s"] == pytest.approx(
        12.5 + resumed["wall_time_this_invocation_s"], abs=0.11
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "quiet" / "log.jsonl").open()]
    assert steps == [0, 1]


def test_a_set_sampled_in_batches_gives_each_batch_its_own_starting_noise(base):
    from cnet.train.evaluation import sample_set

    pipe = load_base(base)
    prompts = ["red circle with blue background"] * 4
    whole = sample_set(pipe, None, prompts, None, steps=2, seed=7, batch_size=2)
    # batch k starts from seed + its first index, whatever else is sampled
    second = sample_set(pipe, None, prompts[2:], None, steps=2, seed=9, batch_size=2)
    assert torch.equal(whole[2:], second)
    assert not torch.equal(whole[:2], whole[2:])  # the same prompts, other noise


def test_the_pretrained_copy_can_train_slower_than_the_parts_that_start_from_scratch(base):
    from cnet.train import build_controlnet
    from cnet.train.optim import make_optimizer

    pipe = load_base(base)
    cpu = torch.device("cpu")
    one = make_optimizer(build_controlnet(pipe, TrainConfig()), pipe.unet, TrainConfig(), cpu)
    assert len(one.param_groups) == 1  # the default: one group, as every earlier run trained

    config = TrainConfig(lr=4e-3, copy_lr_scale=0.25)
    torch.manual_seed(0)
    controlnet = build_controlnet(pipe, config)
    optimizer = make_optimizer(controlnet, pipe.unet, config, cpu)
    copy, scratch = optimizer.param_groups
    theta_c = controlnet.theta_c_parameters()
    assert {id(p) for p in copy["params"]} == {id(p) for p in theta_c}
    assert copy["lr"] == 4e-3 * 0.25 and scratch["lr"] == 4e-3
    everything = {id(p) for p in controlnet.parameters()}
    assert {id(p) for p in scratch["params"]} == everything - {id(p) for p in theta_c}
    encoder = {id(p) for p in controlnet.hint_encoder.parameters()}
    zero = {id(p) for z in controlnet.zero_convolutions.values() for p in z.parameters()}
    assert encoder | zero == everything - {id(p) for p in theta_c}

    # one update: the copy moves exactly as AdamW at the copy's rate moves it, the rest at lr
    torch.manual_seed(1)
    for p in controlnet.parameters():
        p.grad = torch.randn_like(p)
    before = {id(p): p.detach().clone() for p in controlnet.parameters()}
    reference = {id(p): torch.nn.Parameter(before[id(p)].clone()) for p in controlnet.parameters()}
    for p in controlnet.parameters():
        reference[id(p)].grad = p.grad.clone()
    for group, lr in ((copy, 1e-3), (scratch, 4e-3)):
        params = [reference[id(p)] for p in group["params"]]
        torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, foreach=True).step()
    optimizer.step()
    for p in controlnet.parameters():
        assert torch.equal(p.detach(), reference[id(p)].detach())
        assert not torch.equal(p.detach(), before[id(p)])

    # ControlNet-lite's blocks start from scratch: of its copy only conv_in is the base's
    lite = TrainConfig(lr=4e-3, copy_lr_scale=0.25, trainable_copy="lite")
    controlnet = build_controlnet(pipe, lite)
    slow, fast = make_optimizer(controlnet, pipe.unet, lite, cpu).param_groups
    assert {id(p) for p in slow["params"]} == {id(p) for p in controlnet.conv_in.parameters()}
    blocks = [*controlnet.down_blocks.parameters(), *controlnet.mid_block.parameters()]
    assert blocks and {id(p) for p in blocks} <= {id(p) for p in fast["params"]}


def test_a_clip_scales_the_update_to_its_norm_only_above_it(base, tmp_path):
    """max_grad_norm: 0 and a clip the gradient never reaches leave the update's gradient as it
    is, bit for bit; a clip below its norm scales it to that norm, and the log says from what."""
    from cnet.train import Trainer

    seen = {}
    for name, clip in (("none", 0.0), ("loose", 1e6), ("tight", 1e-4)):
        trainer = Trainer(_config(base, tmp_path / name, max_grad_norm=clip, steps=1))
        trainer.load_data()
        params = [p for group in trainer.optimizer.param_groups for p in group["params"]]

        def keep(step, controlnet, name=name, params=params):
            seen[name] = [p.grad.clone() for p in params]

        trainer.on_update = keep
        _, seen[name + " log"] = trainer.step(0, log=True)
        trainer.close()

    def norm(grads):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    assert all(torch.equal(a, b) for a, b in zip(seen["none"], seen["loose"], strict=True))
    assert "clipped_from" not in seen["none log"] and "clipped_from" not in seen["loose log"]
    total = norm(seen["none"]).item()
    assert total > 1e-3  # the clip acts
    assert seen["tight log"]["clipped_from"] == pytest.approx(total, rel=1e-6)
    assert norm(seen["tight"]).item() == pytest.approx(1e-4, rel=1e-3)
    for a, b in zip(seen["none"], seen["tight"], strict=True):
        torch.testing.assert_close(b, a * (1e-4 / (total + 1e-6)), rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------- ema_decay: the average
# A run that averages its ControlNet's weights evaluates, keeps and ships the average, which
# follows diffusers' EMAModel update rule, and resumes exactly.

AVERAGED = {"ema_decay": 0.5, "lr": 1e-2, "eval_size": 2}


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_the_average_follows_the_update_rule_and_is_what_an_evaluation_samples(base, tmp_path):
    r"""After update k the average is :math:`d_k \bar\theta + (1 - d_k)\theta` with
    :math:`d_k = \min(0.5, (1 + j) / (10 + j))`, j = k - 1: the first update copies the weights
    (j = 0), the second keeps 2/11 of the average, the fourth 4/13 and never more than 0.5.
    The evaluation samples the average, the best weights are the average's, and the
    ControlNet being trained is left as the optimizer made it."""
    trainer = Trainer(_config(base, tmp_path / "run", **AVERAGED))
    trainer.load_data()
    expected = _flat(trainer.trained)
    for k in range(3):
        trainer.step(k)
        j = k  # the EMA's count after update k + 1, less one
        d = 0.0 if j == 0 else min(0.5, (1 + j) / (10 + j))
        # EMAModel's own order of operations, so the comparison can be exact
        expected = expected - (1 - d) * (expected - _flat(trainer.trained))
        assert torch.equal(_flat(trainer.averaged), expected)
    assert not torch.equal(_flat(trainer.averaged), _flat(trainer.trained))
    assert not any(p.requires_grad for p in trainer.averaged.parameters())

    metrics = trainer.evaluate(3)
    trainer.save(3)
    trainer.close()
    on_average, _ = evaluate(
        trainer.pipe, ControlledUNet(trainer.pipe.unet, trainer.averaged).eval(),
        trainer.eval_data, 2, trainer.config.guidance_scale,
    )  # fmt: skip
    assert metrics == on_average
    best = load_file(tmp_path / "run" / "best.safetensors")
    saved = load_file(tmp_path / "run" / "checkpoint.safetensors")
    for name, p in trainer.averaged.state_dict().items():
        assert torch.equal(best[f"controlnet.{name}"], p), name
        assert torch.equal(saved[f"ema_controlnet.{name}"], p), name
    for name, p in trainer.trained.state_dict().items():
        assert torch.equal(saved[f"controlnet.{name}"], p), name


@pytest.mark.slow
def test_an_averaged_run_resumes_exactly_and_ships_its_average(base, tmp_path):
    """Stopped at step 2 and resumed, the checkpoint (weights, average, optimizer) equals the
    uninterrupted run's; the run's result, loaded from the folder, is the average."""
    train(_config(base, tmp_path / "straight", eval_every=2, **AVERAGED))
    train(_config(base, tmp_path / "resumed", eval_every=2, **{**AVERAGED, "steps": 2}))
    train(_config(base, tmp_path / "resumed", eval_every=2, **AVERAGED))
    a = load_file(tmp_path / "straight" / "checkpoint.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("ema_controlnet.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    shipped = load_controlnet(tmp_path / "resumed").state_dict()
    for name, p in shipped.items():
        assert torch.equal(p, a[f"ema_controlnet.{name}"]), name
    with safe_open(str(tmp_path / "resumed" / "best.safetensors"), "pt") as f:
        step = int(f.metadata()["step"])
        metrics = json.loads(f.metadata()["metrics"])
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").open()]
    assert metrics["iou"] == max(e["eval"]["iou"] for e in log if "eval" in e)
    assert step in {e["step"] for e in log if "eval" in e}


def test_a_run_without_an_average_stores_none(base, tmp_path):
    trainer = Trainer(_config(base, tmp_path / "run", steps=1))
    trainer.load_data()
    trainer.step(0)
    trainer.save(1)
    trainer.close()
    assert trainer.averaged is None and trainer.sampled is trainer.controlled
    keys = load_file(tmp_path / "run" / "checkpoint.safetensors").keys()
    assert not any(k.startswith("ema_") for k in keys)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"ema_decay": 1.0},
            "ema_decay: 1.0 is not allowed; expected a number from 0 up to, not including, 1",
        ),
        (
            {"ema_decay": 0.9, "sd_locked": False},
            "ema_decay: 0.9 is not allowed with sd_locked false; the average is of the "
            "ControlNet's weights alone, so expected 0 there",
        ),
    ],
)
def test_a_bad_average_is_refused_in_one_line(base, tmp_path, settings, message):
    with pytest.raises(SettingError) as refused:
        _config(base, tmp_path / "run", **settings).check()
    assert str(refused.value) == message
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- the other methods

METHOD_CLASSES = {  # what each method trains, the name its checkpoint gives it, what runs it
    "t2i-adapter": ("T2IAdapter", "adapter", "AdaptedUNet"),
    "controlnet-xs": ("ControlNetXSAdapter", "controlnet_xs", "ControlNetXSUNet"),
    "concat": ("UNet2DConditionModel", "concat_unet", "ConcatenatedUNet"),
}


@pytest.mark.parametrize("method", list(METHOD_CLASSES))
def test_another_method_trains_in_the_same_loop_and_ships_as_its_diffusers_class(
    base, tmp_path, method
):
    """The loop trains each method's diffusers class on the locked base (every weight of it
    moves, none of the base's), logs its gradient norm, evaluates through the controlled U-Net,
    checkpoints it under its name, and export ships a folder its diffusers class loads."""
    import diffusers

    import cnet
    from cnet.train import export_run

    class_name, name, runner = METHOD_CLASSES[method]
    trained_class = getattr(diffusers, class_name)
    config = _config(base, tmp_path / "run", method=method, steps=2, eval_every=2)
    trainer = Trainer(config)
    assert type(trainer.trained) is trained_class
    assert type(trainer.controlled) is getattr(cnet, runner)
    before = {k: v.clone() for k, v in trainer.trained.state_dict().items()}
    base_before = _flat(trainer.pipe.unet)
    trainer.close()
    summary = train(config)
    saved = load_file(tmp_path / "run" / "checkpoint.safetensors")
    weights = {k[len(name) + 1 :]: v for k, v in saved.items() if k.startswith(name + ".")}
    assert weights.keys() == before.keys()
    moved = [k for k in weights if k.endswith("weight") and not torch.equal(weights[k], before[k])]
    assert len(moved) == sum(k.endswith("weight") for k in weights)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    steps = [e for e in log if "loss" in e]
    assert all(e["trained_grad_norm"] > 0 and e["copy_grad_norm"] is None for e in steps)

    pipe = load_base(base)
    assert torch.equal(_flat(pipe.unet), base_before)
    trained = build_trained(pipe, config)
    trained.load_state_dict(weights)
    data = cache_data(pipe, "fill", config.eval_size, "eval", config.seed)
    controlled = controlled_by(pipe, trained).eval()
    expected, _ = evaluate(pipe, controlled, data, 2, config.guidance_scale)
    assert summary["final_eval"] == expected

    shipped = export_run(tmp_path / "run", tmp_path / "shipped")
    loaded = trained_class.from_pretrained(shipped / name)
    for key, p in loaded.state_dict().items():
        assert torch.equal(p, weights[key]), key
    with pytest.raises(SettingError, match=f"trained a {method}, not a ControlNet"):
        load_controlnet(tmp_path / "run")


def test_the_concatenating_unet_trains_its_new_channels_at_lr_and_the_rest_slower(base, tmp_path):
    """copy_lr_scale acts on a concatenating U-Net as on a ControlNet's copy: the weights that
    start from the base's at copy_lr_scale x lr, conv_in (which holds the new channels) at lr."""
    config = _config(base, tmp_path / "run", method="concat", copy_lr_scale=0.25, lr=1e-3)
    trainer = Trainer(config)
    slow, fast = trainer.optimizer.param_groups
    assert (slow["lr"], fast["lr"]) == (0.25e-3, 1e-3)
    assert [id(p) for p in fast["params"]] == [id(trainer.trained.conv_in.weight)]
    assert len(slow["params"]) == len(list(trainer.trained.parameters())) - 1
    trainer.close()


@pytest.mark.parametrize(
    "method, setting, value",
    [
        ("t2i-adapter", "copy_lr_scale", 0.25),
        ("t2i-adapter", "trainable_copy", "lite"),
        ("t2i-adapter", "gradient_checkpointing", True),
        ("controlnet-xs", "copy_lr_scale", 0.25),
        ("controlnet-xs", "hint_encoder", "paper"),
        ("concat", "sd_locked", False),
        ("concat", "connections", "gaussian"),
    ],
)
def test_a_controlnets_own_setting_is_refused_for_another_method(
    base, tmp_path, method, setting, value
):
    config = _config(base, tmp_path / "run", method=method, **{setting: value})
    with pytest.raises(SettingError) as refused:
        config.check()
    default = TrainConfig.__dataclass_fields__[setting].default
    assert str(refused.value) == (
        f"{setting}: {value!r} is not allowed with method {method} (a ControlNet's "
        f"setting); expected {default!r}"
    )


def test_several_trained_modules_compose_only_as_controlnets_or_adapters(base, tmp_path):
    """controlled_by takes a list of ControlNets or of T2I-Adapters (diffusers composes those),
    and refuses a mix in one line."""
    from cnet import AdaptedUNet
    from cnet.train.models import build_controlnet

    pipe = load_base(base)
    config = _config(base, tmp_path / "run")
    adapters = [build_trained(pipe, _config(base, tmp_path / "a", method="t2i-adapter"))] * 2
    assert isinstance(controlled_by(pipe, adapters), AdaptedUNet)
    controlnets = [build_controlnet(pipe, config)] * 2
    assert len(controlled_by(pipe, controlnets).controlnets) == 2
    with pytest.raises(ValueError, match="several are allowed only as ControlNets or as T2I"):
        controlled_by(pipe, [adapters[0], controlnets[0]])
