"""The ControlNet training loop on a small random base: the first-step gradient facts, a loss
that goes down, exact resume, and the failure modes (NaN, Ctrl-C)."""

import json

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from cnet import ControlledUNet, ControlNet
from cnet.course.figures import write_run_figures
from cnet.train import (
    TrainConfig,
    TrainingDiverged,
    cache_data,
    diffusion_loss,
    draw_batch,
    load_base,
    task_dataset,
    train,
    zero_conv_norms,
)
from cnet.train.runs import checkpoint_wall_time


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _config(base, out, **kw):
    settings = dict(base=str(base), out=str(out), steps=4, batch_size=4, train_size=16,
                    eval_size=4, eval_every=0, eval_steps=2, checkpoint_every=2, lr=1e-3)
    settings.update(kw)
    return TrainConfig(**settings)


def test_first_step_zero_gradient_to_the_copy_then_nonzero(base):
    pipe = load_base(base)
    controlnet = ControlNet.from_unet(pipe.unet, condition_size=32)
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


def test_loss_decreases_on_a_short_cpu_run(base):
    torch.manual_seed(0)
    pipe = load_base(base)
    controlnet = ControlNet.from_unet(pipe.unet, condition_size=32)
    controlled = ControlledUNet(pipe.unet, controlnet).train()
    data = cache_data(pipe, "fill", 8, "train", seed=0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    fixed = draw_batch(data, TrainConfig(batch_size=4, empty_prompt_ratio=0.0), 0, 0,
                        scheduler, torch.device("cpu"))
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


def test_resume_equals_the_uninterrupted_run(base, tmp_path, monkeypatch):
    train(_config(base, tmp_path / "straight", eval_every=2))
    first = train(_config(base, tmp_path / "resumed", steps=2, eval_every=2))
    ckpt = tmp_path / "resumed" / "checkpoint.safetensors"
    # the checkpoint records the time up to its own saving, a little less than the summary's
    at_step_2 = checkpoint_wall_time(ckpt)
    assert 0 < at_step_2 <= first["wall_time_s"]
    summary = train(_config(base, tmp_path / "resumed", eval_every=2))
    assert summary["resumed_from"] == 2
    assert at_step_2 < checkpoint_wall_time(ckpt) <= summary["wall_time_s"]
    assert summary["wall_time_s"] > first["wall_time_s"] > 0
    config_json = (tmp_path / "resumed" / "config.json").read_text()
    assert train(_config(base, tmp_path / "resumed", eval_every=2)) == summary  # finished: kept
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.001 there, 0.0005 now\)"):
        train(_config(base, tmp_path / "resumed", eval_every=2, lr=5e-4, steps=6))
    with pytest.raises(ValueError, match="at step 4, beyond the requested 3 steps"):
        train(_config(base, tmp_path / "resumed", eval_every=2, steps=3))
    assert (tmp_path / "resumed" / "config.json").read_text() == config_json
    # the wall time adds up over the resume; the weights carry no trace of it
    assert summary["wall_time_s"] == pytest.approx(
        at_step_2 + summary["wall_time_this_invocation_s"], abs=0.11)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = (tmp_path / "straight" / "log.jsonl").read_text()
    assert log_a == (tmp_path / "resumed" / "log.jsonl").read_text()
    samples = load_file(tmp_path / "resumed" / "samples.safetensors")
    assert sorted(samples) == ["step_0", "step_2", "step_4"]
    assert samples["step_4"].dtype == torch.uint8 and samples["step_4"].shape == (4, 3, 32, 32)

    written = write_run_figures(tmp_path / "resumed", prefix="t_")
    assert {p.parent for p in written} == {tmp_path / "resumed" / "figures"}
    assert sorted(p.name for p in written) == sorted(
        f"t_{n}.png" for n in ("fidelity_and_loss", "zero_conv_growth", "first_steps_gradients",
                               "samples_over_training"))
    assert all(p.stat().st_size > 5000 for p in written)


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
    unet_keys = {k[len("unet."):] for k in saved if k.startswith("unet.")}
    changed = {k for k in unet_keys if not torch.equal(saved["unet." + k], before[k])}
    assert changed and all(k.startswith(("up_blocks", "conv_norm_out", "conv_out"))
                           for k in changed)
    assert not any(k.startswith(("down_blocks", "mid_block", "conv_in")) for k in changed)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown task 'sketch'"):
        task_dataset("sketch", 4, "train", 32, 0)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_base("/nonexistent/folder")


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_shapes_condition_trains_and_is_evaluated(base, tmp_path, task):
    # the shapes world's conditions train through the same loop: 3-channel condition images,
    # fidelity measured against the first shape's region and colour
    pipe = load_base(base)
    data = cache_data(pipe, task, 4, "eval", seed=0)
    assert data.condition.shape == (4, 3, 32, 32) and data.condition.amax() > 0
    assert data.extras["region"].shape == (4, 32, 32) and data.extras["region"].any()
    summary = train(_config(base, tmp_path / task, task=task, steps=2, eval_every=2))
    assert set(summary["final_eval"]) == {"iou", "colours_ok", "n"}
    assert summary["final_eval"]["n"] == 4
