"""Training on real image–caption data with SD-shaped models (tiny, random): the data formats, the stream's
invariants, both stages on both families, the CLI path a user scripts against, resume and bad datasets."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_interrupted
from icd import world
from icd.cli import main
from icd.models import lora
from icd.models.loading import GUIDANCE_UNET as GUIDANCE_SUBFOLDER
from icd.models.synthetic import write_pipeline
from icd.train.batches import BatchReader, crop_square
from icd.train.config import ConfigError, load_config
from icd.train.guidance import GuidanceConfig, train_guidance
from icd.train.icd import ICDConfig, train_icd
from icd.train.sources import DataError, ShardSource, expand_braces, open_source

ROOT = Path(__file__).resolve().parents[1]
VOCAB = world.vocabulary()
N_IMAGES = 16


def _caption(i: int) -> str:
    scene = world.sample_scene(i)
    return scene.caption


def _photo(i: int) -> Image.Image:
    """A non-square image with texture (not a world render): sizes and aspects vary with i."""
    rng = np.random.default_rng(i)
    h, w = 64 + 8 * (i % 3), 72 + 12 * (i % 4)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _image_folder(root: Path, n: int = N_IMAGES, *, caption_key: str = "text") -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            name = f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
            _photo(i).save(root / name)
            f.write(json.dumps({"file_name": name, caption_key: _caption(i)}) + "\n")
    return root


def _shards(root: Path, n_shards: int = 2, per_shard: int = 8) -> str:
    root.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                buf = io.BytesIO()
                _photo(i).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", _caption(i).encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{000..{n_shards - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"folder": _image_folder(root / "folder"), "shards": _shards(root / "shards")}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {family: write_pipeline(root / family, family, vocabulary=VOCAB).pipeline for family in ("sd15", "sdxl")}


# ------------------------------------------------------------------------------------------------ invariants
def test_brace_expansion_keeps_padding_and_expands_lists():
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]


def test_crop_square_resizes_the_shorter_side_and_crops_inside():
    im = Image.fromarray(np.arange(40 * 80 * 3, dtype=np.uint32).reshape(40, 80, 3).astype(np.uint8))
    assert crop_square(im, 32).shape == (32, 32, 3)
    left, right = crop_square(im, 32, (0.0, 0.0)), crop_square(im, 32, (0.999, 0.0))
    assert not np.array_equal(left, right)


def test_every_format_opens_with_its_captions(data, tmp_path):
    import datasets

    folder = open_source(str(data["folder"]))
    assert len(folder) == N_IMAGES and folder.captions[3] == _caption(3)
    rows = [json.loads(line) for line in (data["folder"] / "metadata.jsonl").read_text().splitlines()]
    csv_file = data["folder"] / "captions.csv"
    with open(csv_file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["file_name", "text"], *([r["file_name"], r["text"]] for r in rows)])
    assert open_source(str(csv_file)).captions == folder.captions
    ds = datasets.Dataset.from_dict({"image": [_photo(i) for i in range(4)], "text": [_caption(i) for i in range(4)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    hf = open_source(str(tmp_path / "hf"))
    assert hf.captions == [_caption(i) for i in range(4)] and hf.image(2).size == _photo(2).size
    shards = open_source(data["shards"])
    assert isinstance(shards, ShardSource) and len(shards.shards) == 2
    image, caption = shards.read(shards.shards[1], shards.samples(shards.shards[1])[0])
    assert caption == _caption(8) and image.size == _photo(8).size


def test_the_stream_splits_rows_across_processes_without_duplicates(data):
    source = open_source(str(data["folder"]))
    one = BatchReader(source, resolution=32, global_batch=4, seed=3)
    two = [BatchReader(source, resolution=32, global_batch=4, seed=3, rank=r, world=2) for r in range(2)]
    seen = []
    for step in range(N_IMAGES // 4):  # one epoch
        single = one.batch(step)
        parts = [reader.batch(step) for reader in two]
        assert sorted(single.keys) == sorted(parts[0].keys + parts[1].keys)  # the same rows, split
        assert np.array_equal(single.images[0::2], parts[0].images)
        seen += single.keys
    assert sorted(seen) == sorted(source.keys)  # each example once per epoch
    shards = open_source(data["shards"])
    per_rank = [BatchReader(shards, resolution=32, global_batch=4, seed=3, rank=r, world=2) for r in range(2)]
    keys = [{k for s in range(4) for k in reader.batch(s).keys} for reader in per_rank]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0]) == len(keys[1]) == 8  # own shards, a full epoch each


# ------------------------------------------------------------------------------------------- bad datasets
def test_a_wrong_caption_column_or_an_empty_dataset_stops_in_one_line(data, tmp_path, capsys, pipelines):
    with pytest.raises(DataError, match="no caption column 'caption'"):
        open_source(str(data["folder"]), caption_column="caption")
    with pytest.raises(DataError, match="no caption 'caption'"):
        open_source(data["shards"], caption_column="caption")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    for extra, needle in ((["--set", f"data={empty}"], "empty"),
                          (["--set", f"data={data['folder']}", "--set", "caption_column=caption"], "caption column")):
        code = main(["train", "guidance", "--config", str(ROOT / "configs" / "sd15_icd.toml"), "--set",
                     f"model={pipelines['sd15']}", "--set", f"out_dir={tmp_path / 'g'}", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and needle in err and err.startswith("icd: error:"), err
        assert not (tmp_path / "g").exists()  # stopped before training: no run folder


def test_unreadable_images_are_skipped_and_counted(data, tmp_path, pipelines):
    folder = tmp_path / "broken"
    _image_folder(folder, 8)
    (folder / "img03.png").write_bytes(b"not an image")
    (folder / "img05.png").unlink()
    cfg = GuidanceConfig(model=str(pipelines["sd15"]), data=str(folder), resolution=32, steps=2, batch_size=4,
                         out_dir=str(tmp_path / "g"), w_set=(0.0, 2.0), log_every=1, checkpoint_every=2,
                         n_validation=0, threads=1)
    train_guidance(cfg)
    log = (tmp_path / "g" / "log.csv").read_text().splitlines()
    header, last = log[0].split(","), log[-1].split(",")
    assert int(last[header.index("skipped")]) == 2  # one epoch of 8 rows reads both bad files once
    assert float(last[header.index("images_per_s")]) > 0


# ------------------------------------------------------------------------------------ both stages, both families
def test_the_cli_path_guidance_then_icd_then_edit_with_8_nfe(data, tmp_path, capsys, pipelines):
    config = str(ROOT / "configs" / "sd15_icd.toml")
    common = ["--set", f"data={data['folder']}", "--set", "resolution=64", "--set", "steps=3", "--set",
              "batch_size=2", "--set", "mixed_precision=no", "--set", "threads=1"]
    g, i = tmp_path / "G", tmp_path / "I"
    assert main(["train", "guidance", "--config", config, "--set", f"model={pipelines['sd15']}", *common,
                 "--set", f"out_dir={g}"]) == 0
    assert (g / "final" / GUIDANCE_SUBFOLDER / "config.json").is_file() and (g / "final" / "model_index.json").is_file()
    assert (g / "validation.csv").is_file() and list((g / "validation").glob("step-*.png"))
    assert main(["train", "icd", "--config", config, "--set", f"model={g / 'final'}", *common,
                 "--set", f"out_dir={i}"]) == 0
    meta = json.loads((i / "final" / "adapters.json").read_text())
    assert meta["boundaries"]["reverse"] == [0, 259, 519, 779] and meta["rank"] == 64
    assert "psnr" in (i / "validation.csv").read_text()
    capsys.readouterr()
    image = data["folder"] / "img00.jpg"
    assert main(["edit", str(image), "--model", str(g / "final"), "--adapters", str(i / "final"), "--source",
                 _caption(0), "--target", _caption(1), "--swap", "--json", "-o", str(tmp_path / "edit.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 8 and (tmp_path / "edit.png").is_file()
    released = sorted(p.name for p in (i / "final" / "released").iterdir())  # the released format loads too
    assert released == ["forward-19-259-519-779.safetensors", "reverse-259-519-779-999.safetensors"]


def test_sdxl_trains_both_stages_on_webdataset_shards(data, tmp_path, pipelines):
    g = train_guidance(GuidanceConfig(model=str(pipelines["sdxl"]), data=data["shards"], resolution=64, steps=3,
                                      batch_size=2, out_dir=str(tmp_path / "g"), w_set=(0.0, 3.0), threads=1,
                                      n_validation=2, validation_prompts=(_caption(5),)))
    final = train_icd(ICDConfig(model=str(g), data=data["shards"], resolution=64, steps=3, batch_size=2,
                                out_dir=str(tmp_path / "i"), boundaries="4step-2", tau=0.7, rank=4, threads=1,
                                w_set=(0.0, 3.0), n_validation=2, gradient_accumulation=2))
    meta = json.loads((final / "adapters.json").read_text())
    assert meta["boundaries"]["reverse"] == [0, 249, 499, 699]
    state = load_file(str(final / f"{lora.REVERSE}.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if "lora_B" in k)  # trained away from zero


def test_custom_boundaries_are_honoured(data, tmp_path, pipelines):
    g = train_guidance(GuidanceConfig(model=str(pipelines["sd15"]), data=str(data["folder"]), resolution=32,
                                      steps=1, batch_size=2, out_dir=str(tmp_path / "g"), w_set=(0.0,), threads=1,
                                      n_validation=0))
    final = train_icd(ICDConfig(model=str(g), data=str(data["folder"]), resolution=32, steps=1, batch_size=2,
                                out_dir=str(tmp_path / "i"), reverse_boundaries=(0, 499), forward_boundaries=(499, 999),
                                rank=4, threads=1, w_set=(0.0,), n_validation=0))
    saved = json.loads((final / "adapters.json").read_text())["boundaries"]
    assert (saved["reverse"], saved["forward"]) == ([0, 499], [499, 999])


def test_an_interrupted_real_data_run_resumes_to_identical_weights(data, tmp_path, pipelines, monkeypatch):
    def cfg(out):
        return ICDConfig(model=str(pipe), unet_subfolder="unet_guidance", data=str(data["folder"]),
                         resolution=32, steps=3, batch_size=2, out_dir=str(tmp_path / out), rank=4, lr=1e-3,
                         checkpoint_every=1, log_every=1, threads=1, w_set=(0.0, 2.0), random_crop=True,
                         caption_dropout=0.5, n_validation=0)

    import shutil

    pipe = tmp_path / "pipe"  # the released layout plus the distilled UNet inside, as `icd train icd` reads it
    shutil.copytree(pipelines["sd15"], pipe)
    shutil.copytree(pipelines["sd15"].parent / "unet-distilled", pipe / "unet_guidance")
    train_icd(cfg("a"))
    run_interrupted(train_icd, cfg("b"), after=2, monkeypatch=monkeypatch)
    for name in lora.ADAPTERS:
        a = load_file(str(tmp_path / "a" / "final" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "final" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_example_configs_hold_the_papers_settings():
    sd15 = load_config(ICDConfig, ROOT / "configs" / "sd15_icd.toml", "icd")
    sdxl = load_config(ICDConfig, ROOT / "configs" / "sdxl_icd.toml", "icd")
    assert (sd15.batch_size, sd15.lr, sd15.rank, sd15.alpha, sd15.steps, sd15.resolution) == (512, 8e-6, 64, 8,
                                                                                             6000, 512)
    assert sd15.w_set == (0.0, 7.0, 11.0, 15.0, 19.0) and sd15.resolved_boundaries().reverse == (0, 259, 519, 779)
    assert (sdxl.batch_size, sdxl.resolution, sdxl.tau) == (128, 1024, 0.7)
    assert sdxl.resolved_boundaries().reverse == (0, 249, 499, 699)
    with pytest.raises(ConfigError, match="gradient_accumulation"):
        load_config(ICDConfig, ROOT / "configs" / "sd15_icd.toml", "icd", ["gradient_accumulation=0"])
    with pytest.raises(ConfigError, match="log_to"):
        load_config(GuidanceConfig, ROOT / "configs" / "sd15_icd.toml", "guidance", ["log_to=mlflow"])


def test_offline_hub_datasets_and_missing_trackers_stop_in_one_line(monkeypatch):
    import importlib.util

    from icd.train.trackers import check_tracker

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot open the Hugging Face dataset someone/captions") as e:
        open_source("someone/captions")
    assert "\n" not in str(e.value)
    for kind in ("tensorboard", "wandb"):
        if importlib.util.find_spec(kind) is None:
            with pytest.raises(ConfigError, match=f"needs the {kind} package"):
                check_tracker(kind)


def test_the_latent_cache_is_filled_once_and_read_in_later_epochs(data, tmp_path, pipelines):
    def run(out, cache):
        return train_guidance(GuidanceConfig(model=str(pipelines["sd15"]), data=str(data["folder"]), resolution=32,
                                             steps=5, batch_size=4, out_dir=str(tmp_path / out), w_set=(0.0, 2.0),
                                             latent_cache=cache, n_validation=0, threads=1))

    weights = Path(GUIDANCE_SUBFOLDER) / "diffusion_pytorch_model.safetensors"
    cached, plain = load_file(str(run("cached", True) / weights)), load_file(str(run("plain", False) / weights))
    files = list((tmp_path / "cached" / "cache").glob("latents-*/*/*.safetensors"))
    assert len(files) == N_IMAGES  # 5 steps x 4 rows = 20 reads of 16 examples: each encoded once
    assert not (tmp_path / "plain" / "cache").exists() or not list((tmp_path / "plain" / "cache").iterdir())
    assert all(torch.allclose(cached[k], plain[k], atol=1e-5) for k in plain)  # the same latents (to rounding)
