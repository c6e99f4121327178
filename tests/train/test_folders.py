"""Your own data and any Stable Diffusion base, without a hub: folders in the official tutorial's
layout and in diffusers' metadata.jsonl layout, written from the miniature world at 64 px,
train on a tiny random base and on an SD2-style one (linear projections, v-prediction), resume
exactly, write validation grids, export a ControlNetModel that diffusers' pipeline runs, sample
from a checkpoint, and every bad folder gives its one-line error."""

import json
import os

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file

import cnet.train.folders as folders
from cnet.__main__ import main
from cnet.train import SettingError, TrainConfig, diffusion_loss, load_base, train
from cnet.train.runs import export_run, load_controlnet
from cnet.world.data import FillDataset
from cnet.world.export import export_folder

PAIRS = 24


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    plain = tiny_sd_pipeline()
    plain.save_pretrained(root / "sd1")
    torch.manual_seed(0)
    sd2 = StableDiffusionPipeline(
        vae=plain.vae,
        text_encoder=plain.text_encoder,
        tokenizer=plain.tokenizer,
        unet=UNet2DConditionModel.from_config(plain.unet.config, use_linear_projection=True),
        scheduler=DDIMScheduler.from_config(plain.scheduler.config, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd2.save_pretrained(root / "sd2")
    return {"sd1": root / "sd1", "sd2": root / "sd2"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        layout: export_folder(root / layout, layout, PAIRS)
        for layout in ("tutorial", "imagefolder")
    }


def _config(base, data, out, **kw):
    settings = dict(
        base=str(base),
        data=str(data),
        out=str(out),
        steps=4,
        batch_size=4,
        eval_size=4,
        eval_every=2,
        eval_steps=2,
        checkpoint_every=2,
        device="cpu",
    )
    settings.update(kw)
    return TrainConfig(**settings)


def test_both_layouts_hold_the_worlds_pairs(data):
    tutorial, imagefolder = (folders.read_folder(data[k]) for k in ("tutorial", "imagefolder"))
    assert (tutorial.layout, imagefolder.layout) == ("tutorial", "imagefolder")
    world = FillDataset(size=PAIRS, split="train", resolution=64, seed=0).batch(range(4))
    assert tutorial.prompts == imagefolder.prompts and tutorial.prompts[:4] == world["prompt"]
    for i in range(4):
        condition = folders.load_image(tutorial.conditions[i], 64)
        assert torch.equal(condition, world["outline"][i])  # an outline survives PNG exactly
        image = folders.load_image(imagefolder.images[i], 64) * 2 - 1
        assert (image - world["image"][i]).abs().max() <= 1 / 127.5  # 8-bit rounding


def test_images_are_resized_and_centre_cropped(tmp_path):
    from PIL import Image

    wide = torch.zeros(3, 64, 128, dtype=torch.uint8)
    wide[:, :, 24:104] = 255  # a white centre band a little wider than the crop keeps
    path = tmp_path / "wide.png"
    Image.fromarray(wide.permute(1, 2, 0).numpy()).save(path)
    loaded = folders.load_image(path, 32)
    assert loaded.shape == (3, 32, 32) and loaded.min() == 1.0  # the crop is the centre


@pytest.mark.slow
def test_a_folder_run_resumes_exactly_validates_and_ships(bases, data, tmp_path):
    straight = train(_config(bases["sd1"], data["tutorial"], tmp_path / "straight"))
    assert set(straight["final_eval"]) == {"edge_f1", "edge_f1_images", "n"}
    assert straight["final_eval"]["edge_f1_images"] > 0.9  # the held-out images follow them
    train(_config(bases["sd1"], data["tutorial"], tmp_path / "cut", steps=2))
    assert train(_config(bases["sd1"], data["tutorial"], tmp_path / "cut"))["resumed_from"] == 2
    a, b = (load_file(tmp_path / r / "checkpoint.safetensors") for r in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "cut" / "validation").iterdir()) == [
        "step_000000.png",
        "step_000002.png",
        "step_000004.png",
    ]
    shipped = export_run(tmp_path / "straight", tmp_path / "shipped")
    _runs_in_diffusers_pipeline(bases["sd1"], shipped / "controlnet")


def _runs_in_diffusers_pipeline(base, controlnet_folder):
    controlnet = ControlNetModel.from_pretrained(controlnet_folder)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "red circle with blue background",
        image=torch.rand(1, 3, 64, 64),
        num_inference_steps=2,
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_metadata_columns_are_named_as_in_diffusers_script(bases, data, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    rows = [
        json.loads(line)
        for line in (data["imagefolder"] / "metadata.jsonl").read_text().splitlines()
    ]
    renamed = [
        {
            "target": str(data["imagefolder"] / r["file_name"]),
            "caption": r["text"],
            "hint": str(data["imagefolder"] / r["conditioning_image_file_name"]),
        }
        for r in rows
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    with pytest.raises(
        SettingError,
        match="has no 'image' column; it has caption, hint, "
        r"target \(or name it with --image_column\)",
    ):
        train(_config(bases["sd1"], folder, tmp_path / "a", steps=1))
    summary = train(
        _config(
            bases["sd1"],
            folder,
            tmp_path / "b",
            steps=2,
            eval_every=0,
            image_column="target",
            conditioning_image_column="hint",
            caption_column="caption",
        )
    )
    assert summary["steps"] == 2
    # a Hugging Face datasets image folder: file_name, conditioning_image_file_name
    hub_style = tmp_path / "hub-style"
    hub_style.mkdir()
    (hub_style / "metadata.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "file_name": r["target"],
                    "conditioning_image_file_name": r["hint"],
                    "text": r["caption"],
                }
            )
            + "\n"
            for r in renamed
        )
    )
    pairs = folders.read_folder(hub_style)
    assert [str(p) for p in pairs.images] == [r["target"] for r in renamed]
    assert [str(p) for p in pairs.conditions] == [r["hint"] for r in renamed]


@pytest.mark.slow
def test_an_sd2_style_base_trains_on_the_velocity(bases, data, tmp_path):
    pipe = load_base(bases["sd2"])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "noise": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([10, 900]),
        "embeddings": torch.randn(2, 16, 32, generator=g),
        "condition": torch.rand(2, 3, 64, 64),
    }

    def predicts(zt, t, embeddings, condition):
        return torch.zeros_like(zt)

    z0 = batch["latents"] * 0.5
    velocity = scheduler.get_velocity(z0, batch["noise"], batch["timesteps"])
    loss = diffusion_loss(predicts, batch, scheduler, 0.5)
    assert torch.allclose(loss, velocity.pow(2).mean())  # regresses v, not the noise
    assert not torch.allclose(loss, batch["noise"].pow(2).mean())
    train(_config(bases["sd2"], data["imagefolder"], tmp_path / "v", steps=2))
    shipped = export_run(tmp_path / "v", tmp_path / "v-shipped")
    config = json.loads((shipped / "controlnet" / "config.json").read_text())
    assert config["use_linear_projection"] is True
    _runs_in_diffusers_pipeline(bases["sd2"], shipped / "controlnet")


def test_caching_resumes_at_the_first_missing_shard(bases, data, tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "SHARD", 8)
    pipe = load_base(bases["sd1"])
    pairs = folders.read_folder(data["tutorial"])
    real_encode, calls = pipe.vae.encode, {"n": 0}

    def encode_then_fail(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_encode(x)

    monkeypatch.setattr(pipe.vae, "encode", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        folders.cache_folder(pipe, pairs, tmp_path / "cache", chunk=8)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["latents_00000.safetensors"]
    first = (tmp_path / "cache" / "latents_00000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(pipe.vae, "encode", real_encode)
    cached = folders.cache_folder(pipe, pairs, tmp_path / "cache", chunk=8)
    assert len(cached["latent_shards"]) == 3 and len(cached["prompt_shards"]) >= 1
    assert (tmp_path / "cache" / "latents_00000.safetensors").stat().st_mtime_ns == first
    rows = folders.ShardedRows(cached["latent_shards"], "mean", 8)[torch.tensor([0, 9, 23])]
    assert rows.shape == (3, 4, 8, 8)


@pytest.mark.slow
def test_sample_from_a_checkpoint(bases, data, tmp_path, capsys):
    train(_config(bases["sd1"], data["tutorial"], tmp_path / "run", steps=2, eval_every=0))
    out = tmp_path / "sample.png"
    code = main(
        [
            "sample",
            "--controlnet",
            str(tmp_path / "run"),
            "--condition",
            str(data["tutorial"] / "source" / "0.png"),
            str(data["tutorial"] / "source" / "1.png"),
            "--prompt",
            "red circle with blue background",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.is_file()
    from PIL import Image

    assert Image.open(out).size == (2 * 64, 2 * 64)  # two pairs: condition above sample
    assert "edge F1" in capsys.readouterr().out
    assert (
        main(
            [
                "sample",
                "--controlnet",
                str(tmp_path / "none"),
                "--condition",
                str(out),
                "--prompt",
                "x",
            ]
        )
        == 2
    )
    train(
        _config(
            bases["sd1"],
            data["tutorial"],
            tmp_path / "unlocked",
            steps=1,
            eval_every=0,
            sd_locked=False,
        )
    )
    with pytest.raises(SettingError, match="trained the U-Net's decoder too"):
        load_controlnet(tmp_path / "unlocked")


def _bad(tmp_path, name, listing=None, rows=(), files=()):
    folder = tmp_path / name
    folder.mkdir()
    for path, content in files:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    if listing:
        (folder / listing).write_text("".join(r + "\n" for r in rows))
    return folder


def test_every_bad_folder_is_refused_in_one_line(bases, data, tmp_path):
    png = (data["tutorial"] / "source" / "0.png").read_bytes()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    small = (tmp_path / "small.png").read_bytes()
    cases = {
        "no_listing": (_bad(tmp_path, "empty"), "has neither prompt.json"),
        "bad_json": (
            _bad(tmp_path, "json", "prompt.json", ["{not json"]),
            r"prompt.json, line 1 is not JSON",
        ),
        "no_column": (
            _bad(tmp_path, "col", "prompt.json", ['{"source": "a.png"}']),
            "line 1 has no 'target' column; it has source",
        ),
        "no_file": (
            _bad(
                tmp_path,
                "file",
                "prompt.json",
                ['{"source": "s.png", "target": "t.png", "prompt": "p"}'],
                [("t.png", png)],
            ),
            "the condition file .*s.png does not exist",
        ),
        "unreadable": (
            _bad(
                tmp_path,
                "garbage",
                "metadata.jsonl",
                ['{"image": "i.png", "conditioning_image": "c.png", "text": "p"}'] * 6,
                [("i.png", b"not a png"), ("c.png", png)],
            ),
            "i.png is not an image that can be read",
        ),
        "mismatched": (
            _bad(
                tmp_path,
                "sizes",
                "metadata.jsonl",
                ['{"image": "i.png", "conditioning_image": "c.png", "text": "p"}'] * 6,
                [("i.png", png), ("c.png", small)],
            ),
            "i.png is 64x64 but its pair .*c.png is 32x32",
        ),
        "too_small": (
            _bad(
                tmp_path,
                "few",
                "metadata.jsonl",
                ['{"image": "i.png", "conditioning_image": "c.png", "text": "p"}'] * 4,
                [("i.png", png), ("c.png", png)],
            ),
            r"eval_size: 4 is not allowed for .*few \(4 pairs\)",
        ),
    }
    for name, (folder, message) in cases.items():
        with pytest.raises(SettingError, match=message):
            train(_config(bases["sd1"], folder, tmp_path / f"out-{name}", steps=1))
        assert not (tmp_path / f"out-{name}" / "checkpoint.safetensors").exists(), name
    with pytest.raises(SettingError, match="data: '.*nowhere' is not a folder"):
        _config(bases["sd1"], tmp_path / "nowhere", tmp_path / "x").check()
    assert (
        main(
            [
                "train",
                "--base",
                str(bases["sd1"]),
                "--data",
                str(tmp_path / "empty"),
                "--out",
                str(tmp_path / "cli"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert os.path.isdir(tmp_path / "cli")  # nothing but the folder: no checkpoint, no log
    assert not (tmp_path / "cli" / "log.jsonl").exists()


def test_a_folders_latents_encode_its_images_and_its_held_out_pairs_never_train(
    bases, data, tmp_path
):
    """The cache holds the VAE's encoding of each training image in [-1, 1] (as SD's VAE was
    trained), and the last ``eval_size`` pairs are the validation set, left out of training."""
    from cnet.train import Trainer

    config = _config(bases["sd1"], data["tutorial"], tmp_path / "run")
    trainer = Trainer(config)
    trainer.load_data()
    trainer.close()
    pairs = folders.read_folder(
        config.data, config.image_column, config.conditioning_image_column, config.caption_column
    )
    kept = len(pairs) - config.eval_size
    resolution = trainer.pipe.unet.config.sample_size * trainer.pipe.vae_scale_factor
    rows = torch.tensor([0, 1, kept - 1])
    images = torch.stack([folders.load_image(pairs.images[j], resolution) for j in rows.tolist()])
    with torch.no_grad():
        expected = trainer.pipe.vae.encode(images * 2 - 1).latent_dist
    torch.testing.assert_close(trainer.data.latent_mean[rows], expected.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainer.data.latent_std[rows], expected.std, rtol=1e-4, atol=1e-5)
    assert len(trainer.data.condition) == kept  # the held-out pairs are not trained on
    held_out = [folders.load_image(pairs.images[j], resolution) for j in range(kept, len(pairs))]
    assert torch.equal(trainer.eval_data["image"], torch.stack(held_out))


def test_the_image_folder_is_what_datasets_loads_for_diffusers_script(data):
    """``datasets.load_dataset`` reads the exported image folder into the columns diffusers'
    ``train_controlnet.py`` names by default (image, conditioning_image, text), the images
    those of cnet's own reading of the folder."""
    import numpy as np
    from datasets import load_dataset

    folder = data["imagefolder"]
    loaded = load_dataset(str(folder), split="train")
    assert set(loaded.column_names) == {"image", "conditioning_image", "text"}
    assert len(loaded) == PAIRS
    pairs = folders.read_folder(folder)
    row = loaded[3]
    assert row["text"] == pairs.prompts[3]
    for key, files in (("image", pairs.images), ("conditioning_image", pairs.conditions)):
        with Image.open(files[3]) as theirs:
            assert np.array_equal(
                np.asarray(row[key].convert("RGB")), np.asarray(theirs.convert("RGB"))
            )
