"""The paper's ablations (cnet.variants, cnet.experiments.ablate) and the first three updates
(cnet.experiments.first_updates): other connections really replace the zero convolutions and break
Eq. 4, ControlNet-lite keeps the interface and Eq. 4, the cascade of updates 1-2-3 holds with
exact zeros on the real training step, the summary's statistics mean what they say, and the
shipped results are the ones notebook 07 and the README quote."""

import json
from pathlib import Path

import pytest
import torch
from _tiny_unets import inputs, tiny_run, tiny_unet, unet_config

import cnet.experiments.ablate as ablate
from cnet import ControlledUNet, ControlNet
from cnet.experiments.first_updates import GROUPS, first_updates
from cnet.train import SettingError, TrainConfig, read_log
from cnet.train.convergence import onset_step
from cnet.variants import default_init_std, make_lite, replace_connections

SHIPPED = Path(__file__).resolve().parents[2] / "figures" / "07_ablations.json"


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(unet_config(levels=2, layers=1, base=8, attention=(True, False)))


def _controlled(unet, **variant):
    torch.manual_seed(0)
    controlnet = ControlNet.from_unet(unet)
    if variant.pop("lite", False):
        make_lite(controlnet)
    if variant:
        replace_connections(controlnet, generator=torch.Generator().manual_seed(0), **variant)
    return ControlledUNet(unet, controlnet)


@torch.no_grad()
def test_connections_break_eq4_and_lite_keeps_it(unet):
    x, t, text, condition = inputs(unet, 2, 8, 8)
    locked = unet(x, t, text).sample
    assert torch.equal(_controlled(unet)(x, t, text, condition), locked)
    assert torch.equal(_controlled(unet, lite=True)(x, t, text, condition), locked)
    for kind in ("gaussian", "none"):
        assert not torch.allclose(_controlled(unet, kind=kind)(x, t, text, condition), locked)


def test_gaussian_std_follows_the_gain(unet):
    for gain in (1.0, 0.1):
        controlnet = _controlled(unet, kind="gaussian", gain=gain).controlnets[0]
        # each layer's weights in units of its default initialisation's std
        scaled = torch.cat(
            [
                z.weight.reshape(-1) / default_init_std(z)
                for z in [*controlnet.zero_convs, controlnet.mid_zero_conv]
            ]
        )
        assert scaled.std().item() == pytest.approx(gain, rel=0.1)
        # the condition encoder's last layer, the 14th zero convolution, is drawn the same way
        hint = controlnet.hint_encoder.zero_conv
        assert (hint.weight / default_init_std(hint)).std().item() == pytest.approx(gain, rel=0.1)


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv2d(64, 256, 3),
        torch.nn.Conv2d(320, 320, 1),
        torch.nn.Conv2d(64, 512, 3, groups=4),
    ],
    ids=["3x3", "1x1", "grouped"],
)
def test_default_init_std_is_pytorchs_own(conv):
    """Kaiming-uniform with a = sqrt(5) draws U(-1/sqrt(n), 1/sqrt(n)), n the fan-in
    (in channels / groups x kernel area): std 1/sqrt(3n). Against the weights PyTorch drew."""
    torch.manual_seed(0)
    conv.reset_parameters()
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    assert default_init_std(conv) == 1 / (3 * fan_in) ** 0.5
    assert conv.weight.std().item() == pytest.approx(default_init_std(conv), rel=0.02)
    assert conv.weight.abs().max().item() <= 3**0.5 * default_init_std(conv)


def test_lite_layers_are_silu_then_one_conv_in_the_copys_dtype(unet):
    controlnet = ControlNet.from_unet(unet).double()
    make_lite(controlnet)
    # built in the ControlNet's dtype (and device), not PyTorch's default float32
    assert {p.dtype for p in controlnet.parameters()} == {torch.float64}
    layer = controlnet.down_blocks[0].resnets[0]
    x = torch.randn(2, layer[1].in_channels, 8, 8, dtype=torch.float64)
    assert torch.equal(layer(x), layer[1](torch.nn.functional.silu(x)))
    # as in diffusers' down blocks, a level without a downsampler has None there
    assert controlnet.down_blocks[-1].downsamplers is None
    assert len(controlnet.down_blocks[0].downsamplers) == 1


def test_gaussian_std_can_be_absolute(unet):
    # std = lr: the same std in every layer, whatever its fan-in, the condition encoder's too
    controlnet = _controlled(unet, kind="gaussian", gain=1.0, std=2e-3).controlnets[0]
    convs = [*controlnet.zero_convs, controlnet.mid_zero_conv, controlnet.hint_encoder.zero_conv]
    weights = torch.cat([z.weight.reshape(-1) for z in convs])
    assert weights.std().item() == pytest.approx(2e-3, rel=0.1)
    assert len({default_init_std(z) for z in convs}) > 1  # a gain would differ per layer
    with pytest.raises(ValueError, match="connection_std: -1"):
        _controlled(unet, kind="gaussian", std=-1.0)
    config = ablate.ablation_config("gaussian-lr", 0)
    assert config.connection_std == config.lr  # the size of AdamW's first step


def test_none_means_identity_and_lite_one_conv_per_block(unet):
    controlnet = _controlled(unet, kind="none").controlnets[0]
    assert all(isinstance(z, torch.nn.Identity) for z in controlnet.zero_convs)
    assert "zero_conv.hint" in controlnet.zero_convolutions  # the encoder's layer stays a conv
    lite = _controlled(unet, lite=True).controlnets[0]
    full = ControlNet.from_unet(unet)
    assert lite.skip_channels == full.skip_channels  # the same 12 + 1 slots
    layers = [m for m in lite.down_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(layers) == len(full.skip_channels) - 1  # one conv per layer / downsampler
    middle = [m for m in lite.mid_block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(middle) == 1  # the middle block too is one conv, channels kept
    assert middle[0].in_channels == middle[0].out_channels == full.skip_channels[-1]
    assert not any(p.requires_grad for p in lite.time_embedding.parameters())
    trainable = sum(p.numel() for p in lite.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in full.parameters())


def test_gaussian_connections_default_gain_reproducible_draws_and_refusals(unet):
    torch.manual_seed(0)
    controlnet = replace_connections(ControlNet.from_unet(unet), "gaussian")  # gain 1
    convs = [*controlnet.zero_convs, controlnet.mid_zero_conv]
    scaled = torch.cat([z.weight.reshape(-1) / default_init_std(z) for z in convs])
    assert scaled.std().item() == pytest.approx(1.0, rel=0.1)
    # the draws come from the generator given, whatever torch's global state
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        net = replace_connections(
            ControlNet.from_unet(unet), "gaussian", generator=torch.Generator().manual_seed(7)
        )
        draws.append(net.mid_zero_conv.weight.detach().clone())
    assert torch.equal(*draws)
    fresh = ControlNet.from_unet(unet)
    expected = "is not allowed; expected"
    for setting, message in [
        (dict(kind="random"), f"^connections: 'random' {expected} one of zero, gaussian, none$"),
        (dict(kind="gaussian", gain=0.0), f"^connection_gain: 0.0 {expected} a number > 0$"),
        (dict(kind="gaussian", gain=float("inf")), "^connection_gain: inf is not allowed"),
        (dict(kind="gaussian", std=0.0), f"^connection_std: 0.0 {expected} a number > 0$"),
    ]:
        with pytest.raises(ValueError, match=message):
            replace_connections(fresh, **setting)


def test_bad_variant_settings_are_refused():
    with pytest.raises(SettingError, match="connections: 'random'"):
        TrainConfig(connections="random").check()
    with pytest.raises(SettingError, match="trainable_copy"):
        TrainConfig(trainable_copy="tiny").check()
    with pytest.raises(SettingError, match="variant: 'big'"):
        ablate.ablation_config("big", 0)
    with pytest.raises(SettingError, match="studies: 'nope'"):
        ablate.run_studies(["nope"])


def test_onset_needs_two_evaluations_above_the_band():
    steps = [0, 25, 50, 75, 100, 125]
    assert onset_step(steps, [0.30, 0.36, 0.31, 0.40, 0.60, 0.80]) == 75  # 25: a lone bump
    assert onset_step(steps, [0.30, 0.32, 0.33, 0.31, 0.34, 0.40]) is None
    with pytest.raises(ValueError, match="step-0"):
        onset_step(steps[1:], [0.3] * 5)


def test_spread_counts_the_seeds_with_a_value():
    a, b = ablate.spread([0.8, 0.9, 0.85]), ablate.spread([0.5, 0.6, None])
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.85) and a["sd"] == pytest.approx(0.05)
    assert (a["min"], a["max"]) == (0.8, 0.9)
    assert b["n"] == 2 and b["of"] == 3 and b["mean"] == pytest.approx(0.55)
    assert ablate.spread([None, None]) == {"n": 0, "of": 2}


def test_first_three_updates_exactly(base, tmp_path):
    config = TrainConfig(
        base=str(base),
        out=str(tmp_path),
        batch_size=4,
        train_size=16,
        eval_size=4,
        lr=2e-3,
        device="cpu",
    )
    report = first_updates(config)
    residual, hint_zero, hint_inner, copy = GROUPS
    zero = [{g for g in GROUPS if u[g]["grad_exactly_zero"]} for u in report["updates"]]
    assert zero == [{hint_zero, hint_inner, copy}, {hint_inner}, set()]
    first = report["updates"][0]
    # a zero gradient moves a parameter by AdamW's decay alone, bit for bit
    assert all(first[g]["decay_only"] for g in (hint_zero, hint_inner, copy))
    assert not first[hint_zero]["moved"]  # 0 decayed is 0
    assert first[copy]["moved"]  # the copy shrinks at update 1 without any gradient
    assert report["first_step"]["max_deviation_from_adamw_formula"] < 1e-8
    # |step| = lr |g| / (|g| + eps) < lr, with lr as the optimizer holds it (float32)
    assert report["first_step"]["max_abs_step"] <= float(torch.tensor(config.lr))


@pytest.mark.slow
def test_summary_of_tiny_studies(base, tmp_path, monkeypatch):
    settings = tiny_run(base, steps=6, eval_every=1, lr=2e-3, device="cpu")
    monkeypatch.setattr(ablate, "ABLATION_SETTINGS", settings)
    root = tmp_path / "ablate"
    runs = ablate.run_studies(["lite"], seeds=[0], root=root)
    assert [r.relative_to(root).as_posix() for r in runs] == ["default/seed0", "lite/seed0"]
    result = ablate.summarize(["lite"], [0], root)
    lite, default = result["variants"]["lite"], result["variants"]["default"]
    assert lite["trainable_parameters"] < default["trainable_parameters"]
    assert default["aggregate"]["step0_deviation"]["max"] == 0.0  # Eq. 4, for every seed
    assert lite["aggregate"]["copy_drift"]["n"] == 0  # lite copies no blocks
    assert default["aggregate"]["copy_drift"]["min"] > 0
    assert len(default["runs"][0]["curves"]["eval_steps"]) == 7
    # onsets are counted from the locked base's fidelity (the default run's step 0, per seed),
    # not from a variant's own step 0
    assert default["runs"][0]["key"]["reference"] is None
    assert lite["runs"][0]["key"]["reference"] == default["runs"][0]["curves"]["iou"][0]
    assert result["studies"]["lite"] == {
        "variants": ["default", "lite"],
        "not_run": [],
        "reference": "default",
    }
    # a variant not finished on every seed is left out and its commands listed, not half-run
    (root / "lite" / "seed0" / "run.json").unlink()
    partial = ablate.summarize(["lite"], [0], root)
    assert list(partial["variants"]) == ["default"]
    assert partial["studies"]["lite"]["not_run"] == ["lite"]
    assert partial["not_run"] == {"lite": [ablate.train_command("lite", 0, root)]}
    log = read_log(runs[0])  # the cascade in the log: the encoder's inner layers from update 3
    assert log.hint_grad_norm[:2] == [0.0, 0.0] and log.hint_grad_norm[2] > 0
    assert log.copy_grad_norm[0] == 0.0 and log.copy_grad_norm[1] > 0


@pytest.mark.slow
def test_a_continued_variant_starts_from_the_run_it_continues(base, tmp_path, monkeypatch):
    settings = tiny_run(base, steps=4, eval_every=2, lr=2e-3, device="cpu")
    monkeypatch.setattr(ablate, "ABLATION_SETTINGS", settings)
    monkeypatch.setitem(ablate.VARIANTS, "default-2x", {"steps": 6})
    root = tmp_path / "ablate"
    ablate.run_studies(["seeds"], seeds=[0], root=root)
    short, long = (read_log(root / v / "seed0") for v in ("default", "default-2x"))
    assert long.steps == list(range(6)) and short.steps == list(range(4))
    assert long.loss[:4] == short.loss and long.eval_iou[:3] == short.eval_iou
    assert json.loads((root / "default-2x/seed0/run.json").read_text())["resumed_from"] == 4


def test_shipped_results_hold_the_cascade_and_every_seed():
    result = json.loads(SHIPPED.read_text())
    assert set(result["studies"]) == set(ablate.STUDIES)
    assert result["seeds"] == list(ablate.SEEDS)
    for variant in result["variants"].values():  # every variant on every seed: paired
        assert [r["seed"] for r in variant["runs"]] == result["seeds"]
    assert set(result["variants"]) | set(result["not_run"]) == set(ablate.VARIANTS)
    assert result["settings"] == ablate.ABLATION_SETTINGS
    zero = [
        {g for g in GROUPS if u[g]["grad_exactly_zero"]} for u in result["first_updates"]["updates"]
    ]
    assert zero == [set(GROUPS[1:]), {GROUPS[2]}, set()]
    assert result["variants"]["default"]["aggregate"]["step0_deviation"]["max"] == 0.0
    assert result["command"].startswith("python -m cnet ablate")


def test_each_run_has_the_train_command_that_makes_it(monkeypatch):
    from cnet.__main__ import _parser, _train_settings

    monkeypatch.chdir(SHIPPED.parents[1])  # the settings' base is relative to the clone
    for variant in ablate.VARIANTS:
        argv = ablate.train_command(variant, 2).split()[3:]
        _, config = _train_settings(_parser().parse_args(argv), "quick")
        assert config == ablate.ablation_config(variant, 2), variant


def test_readme_quotes_the_shipped_table():
    from cnet.course.ablation_report import ablation_table

    readme = (SHIPPED.parents[1] / "README.md").read_text()
    assert ablation_table(json.loads(SHIPPED.read_text())) in readme


def test_bench_readme_quotes_the_shipped_step_times():
    from cnet.course.ablation_report import step_time_table

    bench_readme = (SHIPPED.parents[1] / "bench" / "README.md").read_text()
    assert step_time_table(json.loads(SHIPPED.read_text())) in bench_readme


def test_a_run_that_stops_predicting_the_noise_counts_as_diverged():
    steps = list(range(100))
    healthy = [0.09] * 100
    assert ablate.diverged_at(steps, healthy) is None
    blown = [0.09] * 60 + [1.0] * 40  # finite, but predicting nothing of the noise
    # the 25-step mean ending at step s holds s - 59 losses of 1: above 0.5 first when
    # 0.09 (25 - k) + k > 12.5, k = 12, at step 71
    assert ablate.diverged_at(steps, blown) == 71
