"""accelerate as the training engine, on the CPU: two processes (gloo) against one process of
the same global batch, a killed two-process run resumed exactly, bf16 autocast against fp32,
fp16 with loss scaling, and gradient checkpointing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from safetensors import safe_open
from safetensors.torch import load_file

import cnet.train.loop as loop
from cnet.checkpoints import checkpoint_metadata
from cnet.train import PROFILES, SettingError, TrainConfig, train
from cnet.train.engine import make_accelerator, process_share, resolve_precision

LR = 1e-3
# Two processes average two half-batch gradients where one process averages the whole batch:
# the same numbers summed in another order. Adam divides each gradient by its own running
# RMS, so a rounding-level difference in a near-zero gradient can move its weight by a small
# fraction of the learning rate: after 4 steps no weight differs by more than a tenth of it.
WEIGHT_TOLERANCE = 0.1 * LR


def _flags(base, out, **kw):
    # uniform timesteps: the draws the tolerance above was measured with
    settings = dict(
        base=base,
        out=out,
        steps=4,
        batch_size=4,
        train_size=16,
        eval_size=4,
        eval_every=0,
        checkpoint_every=2,
        lr=LR,
        device="cpu",
        timesteps="uniform",
    )
    settings.update(kw)
    return settings


def _torchrun(script_args, tmp_path):
    """Two CPU processes, as a user starts them: torchrun sets the environment accelerate reads
    (ranks, world size, rendezvous), and accelerate builds the gloo process group."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *script_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )


def _cli(settings):
    return ["train", *[f"--{k}={v}" for k, v in settings.items()]]


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    done = _torchrun(["-m", "cnet", *_cli(_flags(base, tmp / "run"))], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run", done


@pytest.mark.slow
def test_two_processes_equal_one_process_of_the_same_global_batch(base, tmp_path, two_process_run):
    two, done = two_process_run
    assert done.stdout.count("done: 4 steps") == 1  # the main process reports, once
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    one = tmp_path / "one"
    # what the command line builds: the quick profile (on a CPU) under the flags
    quick = TrainConfig(**{**PROFILES["quick"], **_flags(str(base), str(one))})
    assert train(quick)["processes"] == 1
    for a, b in zip(_log(one), _log(two), strict=True):
        # the same weights at step 0, so float rounding only; then the weights differ too
        rel = 1e-5 if a["step"] == 0 else 1e-3
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["copy_grad_norm"] == pytest.approx(b["copy_grad_norm"], rel=rel, abs=1e-12)
        for name, norm in a["grad_norm"].items():
            assert norm == pytest.approx(b["grad_norm"][name], rel=rel, abs=1e-12), name
    w1, w2 = (load_file(run / "checkpoint.safetensors") for run in (one, two))
    assert w1.keys() == w2.keys()
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert worst <= WEIGHT_TOLERANCE
    assert any(w1[k].abs().max() > 0 for k in w1 if k.startswith("controlnet.zero_convs"))


KILLER = """
import os, signal, sys
import cnet.train.loop as loop

real_step = loop.Trainer.step


def step_or_die(trainer, step, log=None):
    if step == {kill_at} and trainer.accelerator.process_index == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a pre-empted node would
    return real_step(trainer, step, log)


loop.Trainer.step = step_or_die
from cnet.__main__ import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_exactly(base, tmp_path, two_process_run):
    straight, _ = two_process_run
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(kill_at=3))
    cut = tmp_path / "cut"
    killed = _torchrun([str(script), *_cli(_flags(base, cut))], tmp_path)
    assert killed.returncode != 0
    with safe_open(str(cut / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"  # the last checkpoint before the kill
    resumed = _torchrun(["-m", "cnet", *_cli(_flags(base, cut))], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cut / "run.json").read_text())["resumed_from"] == 2
    a, b = (load_file(run / "checkpoint.safetensors") for run in (straight, cut))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (straight / "log.jsonl").read_text() == (cut / "log.jsonl").read_text()


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_and_its_loss_tracks_fp32(base, tmp_path):
    runs = {
        p: train(
            TrainConfig(
                **_flags(
                    str(base), str(tmp_path / p), mixed_precision=p, steps=6, checkpoint_every=6
                )
            )
        )
        for p in ("no", "bf16")
    }
    assert runs["bf16"]["mixed_precision"] == "bf16"
    fp32, bf16 = _log(tmp_path / "no"), _log(tmp_path / "bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02), a["step"]
    # the first-step facts do not depend on the precision: exactly zero behind the zero convs
    assert bf16[0]["copy_grad_norm"] == 0.0 and bf16[0]["grad_norm"]["zero_conv.hint"] == 0.0
    assert all(bf16[0]["grad_norm"][f"zero_conv.{i}"] > 0 for i in range(12))
    assert bf16[1]["copy_grad_norm"] > 0
    weights = load_file(tmp_path / "bf16" / "checkpoint.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def _cpu_fp16(init_scale):
    """accelerate runs fp16 with loss scaling on GPUs only; torch has float16 autocast and a
    GradScaler on the CPU too, so this switches accelerate's fp16 path on there, unchanged."""

    def make(config):
        accelerator = make_accelerator(config)
        accelerator.state._mixed_precision = "fp16"
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return accelerator

    return make


@pytest.mark.slow
def test_fp16_with_loss_scaling_logs_true_gradients_skips_overflows_and_resumes(
    base, tmp_path, monkeypatch
):
    fp32 = tmp_path / "fp32"
    train(TrainConfig(**_flags(str(base), str(fp32))))
    monkeypatch.setattr(loop, "make_accelerator", _cpu_fp16(init_scale=2.0**8))
    train(TrainConfig(**_flags(str(base), str(tmp_path / "fp16"))))
    first32, first16 = _log(fp32)[0], _log(tmp_path / "fp16")[0]
    # computed in float16 (autocast is on), so close to the fp32 loss but not equal to it
    assert first16["loss"] == pytest.approx(first32["loss"], rel=0.01)
    assert first16["loss"] != first32["loss"]
    for name, norm in first32["grad_norm"].items():  # unscaled before they are logged
        assert first16["grad_norm"][name] == pytest.approx(norm, rel=0.02, abs=1e-9), name
    with safe_open(str(tmp_path / "fp16" / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["grad_scaler"])["scale"] == 2.0**8
    # resume: the loss scale comes back with the weights, and the run goes on exactly
    train(TrainConfig(**_flags(str(base), str(tmp_path / "half"), steps=2)))
    train(TrainConfig(**_flags(str(base), str(tmp_path / "half"))))
    a, b = (load_file(tmp_path / r / "checkpoint.safetensors") for r in ("fp16", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a scale so large that float16 overflows: the update is skipped (no weight moves, not even
    # by weight decay) and the scale backs off
    monkeypatch.setattr(loop, "make_accelerator", _cpu_fp16(init_scale=2.0**60))
    log = []
    train(TrainConfig(**_flags(str(base), str(tmp_path / "over"), steps=2)), on_log=log.append)
    assert log[0].get("update_skipped") and log[1]["weight_norm"] == log[0]["weight_norm"]
    with safe_open(str(tmp_path / "over" / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["grad_scaler"])["scale"] < 2.0**60


@pytest.mark.slow
def test_gradient_checkpointing_changes_memory_not_the_numbers(base, tmp_path):
    plain = tmp_path / "plain"
    train(TrainConfig(**_flags(str(base), str(plain))))
    train(TrainConfig(**_flags(str(base), str(tmp_path / "ckpt"), gradient_checkpointing=True)))
    a, b = (load_file(run / "checkpoint.safetensors") for run in (plain, tmp_path / "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # switched on or off, a run resumes: it recomputes the same activations
    train(
        TrainConfig(
            **_flags(str(base), str(tmp_path / "mixed"), steps=2, gradient_checkpointing=True)
        )
    )
    train(TrainConfig(**_flags(str(base), str(tmp_path / "mixed"))))
    c = load_file(tmp_path / "mixed" / "checkpoint.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_precision_and_process_settings_are_checked_before_any_work(base, tmp_path):
    assert resolve_precision("auto", torch.device("cpu")) == "no"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(
        SettingError,
        match="mixed_precision: 'fp32' is not allowed; expected one of auto, no, fp16, bf16",
    ):
        TrainConfig(base=str(base), mixed_precision="fp32").check()
    with pytest.raises(SettingError, match="mixed_precision: 'fp16' is not allowed on the CPU"):
        train(TrainConfig(**_flags(str(base), str(tmp_path / "x"), mixed_precision="fp16")))
    assert not (tmp_path / "x" / "log.jsonl").exists()


def test_each_process_takes_its_own_equal_slice():
    class Two:
        num_processes, device = 2, torch.device("cpu")
        split_between_processes = PartialState.split_between_processes

        def __init__(self, index):
            self.process_index = index

    batch = {"timesteps": torch.arange(6), "latents": torch.arange(6.0)[:, None]}
    halves = [process_share(batch, Two(i)) for i in (0, 1)]
    assert torch.equal(torch.cat([h["timesteps"] for h in halves]), batch["timesteps"])
    assert torch.equal(torch.cat([h["latents"] for h in halves]), batch["latents"])
    AcceleratorState._reset_state()


def test_channels_last_changes_the_layout_and_the_rounding_only(base, tmp_path):
    """A run in channels-last memory computes the same steps with another order of summation:
    the same loss and gradient norms to float32 rounding, the same checkpoint (keys, shapes),
    and a run resumes across the switch either way, the optimizer's moments in its parameters'
    layout (fused AdamW on a GPU requires it)."""
    logs = {}
    for layout in (False, True):
        config = TrainConfig(**_flags(str(base), str(tmp_path / str(layout)), channels_last=layout))
        trainer = loop.Trainer(config)
        trainer.load_data()
        conv = trainer.trained.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == layout
        assert conv.is_contiguous() != layout
        logs[layout] = [trainer.step(k, log=True)[1] for k in range(2)]
        trainer.save(2)
        trainer.close()
    for plain, last in zip(logs[False], logs[True], strict=True):
        assert last["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        for name, norm in plain["grad_norm"].items():
            assert last["grad_norm"][name] == pytest.approx(norm, rel=1e-3, abs=1e-12), name
    a, b = (load_file(tmp_path / run / "checkpoint.safetensors") for run in ("False", "True"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for run, layout in (("True", False), ("False", True)):  # each resumed in the other layout
        trainer = loop.Trainer(
            TrainConfig(**_flags(str(base), str(tmp_path / run), channels_last=layout))
        )
        assert trainer.start == 2
        optimizer = trainer.optimizer.optimizer
        moments = [(p, v) for p in optimizer.state for v in optimizer.state[p].values()]
        assert any(p.dim() == 4 for p, _ in moments)
        assert all(v.stride() == p.stride() for p, v in moments if v.shape == p.shape)
        trainer.close()
        train(TrainConfig(**_flags(str(base), str(tmp_path / run), channels_last=layout)))
        assert int(checkpoint_metadata(tmp_path / run / "checkpoint.safetensors")["step"]) == 4


def test_a_fresh_accelerator_updates_after_a_run_stopped_between_micro_batches():
    """A run interrupted inside ``accumulate`` leaves accelerate's gradient state saying "do not
    sync"; the next run in the same process (a notebook after Ctrl-C, pretraining after a
    ControlNet run) must still update its weights."""
    from cnet.processes import fresh_accelerator

    stopped = fresh_accelerator(cpu=True, gradient_accumulation_steps=2)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = stopped.prepare(torch.optim.SGD([weight], lr=0.5))
    with stopped.accumulate(torch.nn.Linear(1, 1)):  # the first of two micro-batches
        assert not stopped.sync_gradients
    accelerator = fresh_accelerator(cpu=True)
    optimizer = accelerator.prepare(torch.optim.SGD([weight], lr=0.5))
    weight.sum().backward()
    optimizer.step()
    assert torch.equal(weight.detach(), torch.full((2,), 0.5))
    AcceleratorState._reset_state()
