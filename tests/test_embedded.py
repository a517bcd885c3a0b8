"""The shipped embedded model and judge: they load offline, in diffusers and in our API."""

import numpy as np
import torch

from icd import world
from icd.judge import JudgeScorer
from icd.models.loading import embedded_model_path, load_model


def test_shipped_model_loads_in_stable_diffusion_pipeline():
    """The plain call, no dtype: transformers >= 5 loads the text encoder in its config's dtype and diffusers the
    UNet in fp32, so the shipped text encoder must be fp32 (an fp16 one failed at the first generation)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path(), safety_checker=None)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    out = pipe("a large red circle on a gray background", num_inference_steps=4, guidance_scale=3.0,
               height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_shipped_model_size_and_config():
    total = sum(p.stat().st_size for p in embedded_model_path().rglob("*") if p.is_file())
    assert total <= 30 * 2**20
    model = load_model()
    assert model.image_size == 64 and model.vocabulary is not None
    assert 0.1 < model.scaling_factor < 10
    attn_tokens = [name for name, _ in model.unet.named_modules() if name.endswith("attn2")]
    assert attn_tokens  # cross-attention exists, and only below the 16x16 level by construction
    assert model.unet.config.down_block_types[0] == "DownBlock2D"


def test_shipped_tokenizer_has_one_token_per_word():
    from transformers import CLIPTokenizer

    folder = embedded_model_path() / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    for tok in (CLIPTokenizer.from_pretrained(folder), load_model().tokenizer):
        for word in world.vocabulary():
            assert len(tok(word).input_ids) == 3, word


def test_judge_reads_fresh_renders_exactly():
    judge = JudgeScorer.load()
    scenes = [world.sample_scene(world.EVAL_SEED_START + 50_000 + i, max_objects=3) for i in range(300)]
    images = np.stack([world.render(s) for s in scenes])
    report = judge.score(images, [s.caption for s in scenes])
    assert report["exact"] >= 0.98, report


def test_vae_round_trip_is_accurate():
    from icd.imageio import to_uint8
    from icd.metrics import psnr

    model = load_model()
    images = np.stack([world.render(world.sample_scene(world.EVAL_SEED_START + i)) for i in range(16)])
    recon = to_uint8(model.decode_latents(model.encode_images(images)))
    assert psnr(images, recon).mean() > 28
