"""Train the embedded flow-matching teacher: CLIP + T5 text encoders and a FLUX transformer on VAE latents of world
renders (docs/flow.md §3).

Objective (conditional flow matching / rectified flow; Liu et al. 2022, Lipman et al. 2023, Esser et al. 2024)::

    s ~ shift(sigmoid(N(logit_mean, logit_std^2)), shift)       logit-normal noise level, SD3 eq. 19 and eq. 23
    eps ~ N(0, I) [B, 4, 16, 16],  x_s = (1 - s) z0 + s eps       the rectified-flow path
    L = E || v_theta(pack(x_s), s, c) - pack(eps - z0) ||^2       velocity target eps - z0, plain MSE

- The shift defaults to FLUX's resolution-dependent e^mu for the model's 64 packed image tokens (1.596), the same
  shift `FluxPipeline` applies to its sampling grid, so training spends its noise levels where sampling does.
- *Caption dropout* (10 %): both prompts are replaced by the empty prompt, so two-pass classifier-free guidance
  (`true_cfg_scale`) works. The transformer has no guidance embedding (``guidance_embeds = False``): docs/flow.md §2.
- No offset noise by default: at s = 1 the path is pure noise (x_1 = eps), so nothing in the starting noise carries
  the image's background (embedded-notes pitfall 1 needs the non-zero terminal SNR of SD's schedule).
- EMA weights of the transformer and both text encoders are exported as a diffusers `FluxPipeline` folder.

Run: ``python -m icd.train.flow_teacher --config configs/embedded-flow.toml [--set key=value ...] [--no-resume]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from icd import world
from icd.io import atomic_directory
from icd.models import flux_embedded as fe
from icd.paths import embedded_model_path
from icd.runtime import step_generator
from icd.schedule import FlowSchedule, flux_mu, logit_normal_sigmas, velocity_target
from icd.train.checkpoint import load_checkpoint, resume_checkpoint
from icd.train.config import ConfigError, RunConfig, load_config
from icd.train.data import CACHE, world_latents
from icd.train.runner import TrainingRun, set_lr, warmup_lr
from icd.train.scaffold import EMA
from icd.train.teacher import teacher_noise

log = logging.getLogger(__name__)

SECTION = "flow_teacher"


@dataclass(frozen=True)
class FlowTeacherConfig(RunConfig):
    out_dir: str = "runs/flow-teacher"  # checkpoints, log.csv and final/ (a diffusers FluxPipeline folder)
    vae_path: str = ""  # trained VAE (diffusers format); "" = the shipped embedded model's VAE
    init_from: str = ""  # a FluxPipeline folder of the same size whose weights start the run ("": random init)
    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4  # AdamW; linear warm-up then cosine decay to lr_min
    lr_min: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.0
    logit_mean: float = 0.0  # logit-normal noise-level density (SD3's rf/lognorm(0, 1))
    logit_std: float = 1.0
    shift: float = 0.0  # training noise-level shift; 0 = FLUX's e^mu for the 64 image tokens
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise (0: plain Gaussian)
    caption_dropout: float = 0.1  # probability of training on the empty prompt
    ema_decay: float = 0.999
    max_objects: int = 2
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 4  # single-stream blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"FlowTeacherConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.offset_noise < 0:
            raise ConfigError(f"FlowTeacherConfig.offset_noise must be >= 0, got {self.offset_noise}")
        if not (math.isfinite(self.shift) and self.shift >= 0):
            raise ConfigError(f"FlowTeacherConfig.shift must be >= 0 (0: FLUX's e^mu), got {self.shift}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ConfigError(f"FlowTeacherConfig.logit_std must be positive, got {self.logit_std}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"FlowTeacherConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"FlowTeacherConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        try:
            self.size()
        except ValueError as e:
            raise ConfigError(f"FlowTeacherConfig: {e}") from None

    def size(self) -> fe.FluxSize:
        """The transformer size; RoPE axes split the head dim as FLUX does (1/4 to the unused axis 0)."""
        d = self.attention_head_dim
        first = 2 * (d // 8)
        rest = (d - first) // 2
        rest -= rest % 2
        return fe.FluxSize(self.num_layers, self.num_single_layers, self.num_attention_heads, d,
                           (d - 2 * rest, rest, rest))

    def training_shift(self, latent_size: int) -> float:
        """`shift`, or FLUX's e^mu for the packed image tokens of `latent_size`² latents."""
        return self.shift or math.exp(flux_mu((latent_size // fe.PATCH) ** 2))


def flow_loss(parts: fe.FluxParts, z0: torch.Tensor, clip_ids: torch.Tensor, t5_ids: torch.Tensor, *,
              s: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """E || v_theta(x_s, s, c) - (eps - z0) ||^2 on packed latents, x_s = (1 - s) z0 + s eps (module docstring)."""
    x_s = FlowSchedule().add_noise(z0, eps, s.double())
    pooled, tokens = fe.encode_text(parts, clip_ids, t5_ids)
    pred = fe.velocity(parts.transformer, fe.pack(x_s), s, pooled=pooled, tokens=tokens, latent_size=z0.shape[-1])
    mse = F.mse_loss(pred, fe.pack(velocity_target(z0, eps)))
    return {"loss": mse}


class _TiedView(torch.nn.Module):
    """A checkpoint view of a module with tied weights (T5's ``shared`` and ``encoder.embed_tokens``): its state
    dict names each tensor once (safetensors refuses shared memory) and loading restores both names."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        seen: dict[int, str] = {}
        self.aliases: dict[str, str] = {}  # dropped name -> kept name
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                self.aliases[name] = seen[id(tensor)]
            else:
                seen[id(tensor)] = name

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self.module.state_dict().items() if k not in self.aliases}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        full = dict(state_dict)
        full.update({alias: state_dict[kept] for alias, kept in self.aliases.items() if kept in state_dict})
        return self.module.load_state_dict(full, strict=strict, assign=assign)


def _load_weights(parts: fe.FluxParts, folder: str | Path) -> None:
    """Copy the transformer's and both text encoders' weights of the `FluxPipeline` folder `folder` into `parts`
    (continuing a run whose checkpoints are gone from its exported or shipped weights). `ConfigError` when a
    component is missing or its shapes differ from the configured size."""
    folder = Path(folder)
    sources = {"transformer": FluxTransformer2DModel, "text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}
    for name, cls in sources.items():
        if not (folder / name / "config.json").is_file():
            raise ConfigError(f"init_from {folder}: no {name}/ (expected a FluxPipeline folder)")
        source = cls.from_pretrained(str(folder / name), torch_dtype=torch.float32)
        try:
            getattr(parts, name).load_state_dict(source.state_dict())
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ConfigError(f"init_from {folder}: {name} does not match the configured size ({first})") from None


def _ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=fe.TEXT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def train_flow_teacher(cfg: FlowTeacherConfig, *, resume: bool = True) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae_path = cfg.vae_path or str(embedded_model_path() / "vae")
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).eval().requires_grad_(False)
    z_all, captions = world_latents(vae, vae_path, cfg.n_images, max_objects=cfg.max_objects, cache_dir=out / CACHE)
    torch.manual_seed(cfg.seed)
    parts = fe.build_parts(out / "tokenizers", world.vocabulary(), cfg.size())
    if cfg.init_from:
        _load_weights(parts, cfg.init_from)
    clip_all, t5_all = _ids(parts.tokenizer, captions), _ids(parts.tokenizer_2, captions)
    clip_empty, t5_empty = _ids(parts.tokenizer, [""]), _ids(parts.tokenizer_2, [""])
    shift = cfg.training_shift(z_all.shape[-1])
    log.info("flow teacher: %d images, %dx%d latents, transformer %.2f M params, training shift %.4f", len(z_all),
             z_all.shape[-2], z_all.shape[-1], sum(p.numel() for p in parts.transformer.parameters()) / 1e6, shift)

    trained = {"transformer": parts.transformer, "text_encoder": parts.text_encoder,
               "text_encoder_2": parts.text_encoder_2}
    averages = EMA(cfg.ema_decay, {f"ema_{k}": m for k, m in trained.items()})
    ema = averages.modules
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = TrainingRun(out, desc="train flow teacher", total_steps=cfg.steps, columns=["loss", "lr"],
                      modules={k: _TiedView(m) for k, m in {**trained, **ema}.items()},
                      optimizers={"flow_teacher": opt}, config=cfg,
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, resume=resume)

    for m in trained.values():
        m.train()
    with run:
        while not run.done:
            # 1. Per-step draws, a pure function of (seed, step)
            gen = step_generator(cfg.seed, run.step)
            idx = torch.randint(len(z_all), (cfg.batch_size,), generator=gen)
            s = logit_normal_sigmas(cfg.batch_size, mean=cfg.logit_mean, std=cfg.logit_std, shift=shift,
                                    generator=gen)
            eps = teacher_noise(tuple(z_all[idx].shape), cfg.offset_noise, gen)
            drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout)[:, None]
            clip_ids = torch.where(drop, clip_empty.expand(cfg.batch_size, -1), clip_all[idx])
            t5_ids = torch.where(drop, t5_empty.expand(cfg.batch_size, -1), t5_all[idx])
            # 2. Loss, backward, clip, step
            lr = set_lr([opt], warmup_lr(run.step, cfg))
            losses = flow_loss(parts, z0=z_all[idx], clip_ids=clip_ids, t5_ids=t5_ids, s=s, eps=eps)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            # 3. EMA (the trainers' one warm-up rule, icd.train.scaffold.EMA)
            averages.update(run.step)
            run.end_step({"loss": losses["loss"].item(), "lr": lr})
    final = fe.FluxParts(parts.tokenizer, ema["ema_text_encoder"], parts.tokenizer_2, ema["ema_text_encoder_2"],
                         ema["ema_transformer"])
    with atomic_directory(out / "final") as tmp:
        fe.save_pipeline(tmp, parts=final, vae=vae, vocabulary=world.vocabulary())
    return out / "final"


def export_checkpoint(cfg: FlowTeacherConfig, dest: str | Path | None = None) -> Path:
    """Write the EMA weights of `cfg.out_dir`'s newest intact checkpoint as a `FluxPipeline` folder (default
    ``<out_dir>/export-<step>``), e.g. to evaluate a run while it trains. `ConfigError` when there is none."""
    out = Path(cfg.out_dir)
    ckpt = resume_checkpoint(out) if out.is_dir() else None
    if ckpt is None:
        raise ConfigError(f"out_dir {out}: no checkpoint to export")
    vae_path = cfg.vae_path or str(embedded_model_path() / "vae")
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).eval()
    dest = Path(dest) if dest is not None else out / f"export-{ckpt.name.removeprefix('step-')}"
    with atomic_directory(dest) as tmp:
        parts = fe.build_parts(tmp / "_tokenizers", world.vocabulary(), cfg.size())
        trained = {"transformer": parts.transformer, "text_encoder": parts.text_encoder,
                   "text_encoder_2": parts.text_encoder_2}
        load_checkpoint(ckpt, modules={f"ema_{k}": _TiedView(m) for k, m in trained.items()})
        fe.save_pipeline(tmp, parts=parts, vae=vae, vocabulary=world.vocabulary())
        shutil.rmtree(tmp / "_tokenizers")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icd.train.flow_teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"TOML file with a [{SECTION}] table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    parser.add_argument("--export", nargs="?", const="", metavar="DIR",
                        help="do not train: write the newest checkpoint's EMA weights as a FluxPipeline folder "
                             "(default <out_dir>/export-<step>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(FlowTeacherConfig, args.config, SECTION, args.overrides)
    except ConfigError as e:
        print(f"icd: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.export is not None:
            print(export_checkpoint(cfg, args.export or None))
        else:
            print(train_flow_teacher(cfg, resume=not args.no_resume))
    except ConfigError as e:
        print(f"icd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
