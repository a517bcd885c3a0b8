"""Train the InstructPix2Pix editor (Brooks, Holynski & Efros 2023) on triples our own teacher made
(`icd.train.ip2p_data`): ``icd train ip2p --config configs/embedded.toml``.

1. Triples: the teacher's Prompt-to-Prompt pairs from noise, judged (`generate_triples`; resumable chunks in
   ``triples_dir``, default ``<out_dir>/triples``).
2. Model: the teacher's UNet widened to 8 input channels (`icd.editing.ip2p.widen_unet`, new channels zero) and the
   IP2P tokenizer / text encoder with the instruction words appended (`extend_text_encoder`); only the UNet and the
   new embedding rows train, the rest of the text encoder stays frozen (IP2P froze CLIP).
3. Objective (epsilon prediction on the noised *target* latent, uniform t in 0..999)::

       x_t = alpha_t z_tgt + sigma_t eps,   L = w(t) || eps_theta(concat(x_t, z_src), t, c_T) - eps ||^2

   with the teacher's recipe for the noise (offset noise) and the weight w(t) (min-SNR-gamma; 0 disables) since
   the model starts from it, and IP2P's conditioning dropout: `text_dropout` of the rows drop the instruction only
   (the empty prompt), `both_dropout` both, `image_dropout` the source latent only (zeros). Instructions are drawn
   per row and step from the kind's paraphrases (`icd.editing.instructions`).
4. Guidance: a grid of (s_T, s_I) on validation cases from training-range seeds (``validation_seed_start``, never
   the held-out bench range) at ``validation_steps``; the best ground-truth PSNR is the folder's default.

Writes ``<out_dir>/final`` (`icd.editing.ip2p.save_folder`), whose ip2p.json records the dataset, the training
cost and the guidance grid. Processes, precision, checkpoints, resume, log.csv and the EMA are `icd.train.scaffold`'s:
several processes split each global batch row-wise, the main process alone generates the triples.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.editing import ip2p
from icd.editing.instructions import INSTRUCTION_WORDS, vocabulary
from icd.io import atomic_directory
from icd.judge import JudgeScorer
from icd.metrics import psnr
from icd.models.base import NFECounter
from icd.runtime import step_generator
from icd.train.config import ConfigError, ProcessConfig, RunConfig
from icd.train.ip2p_data import TripleSpec, generate_triples, load_triples
from icd.train.runner import warmup_lr
from icd.train.scaffold import EMA, Parts, Trainer, Update, run_training
from icd.train.teacher import diffusion_loss, teacher_noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IP2PConfig(ProcessConfig, RunConfig):
    out_dir: str = "runs/ip2p"  # triples/, checkpoints, log.csv and final/ (the IP2P folder)
    model: str = "embedded"  # the teacher: a pipeline folder whose original UNet makes the triples and starts IP2P
    triples_dir: str = ""  # "" = <out_dir>/triples
    n_chunks: int = 40  # triples generated = n_chunks x chunk (before the judge's filter)
    chunk: int = 32  # caption pairs per generation batch (one edit kind per chunk, kinds in turn)
    triple_seed_start: int = 0  # world seeds of the triples: triple_seed_start + i (below 1e9, held-out seeds)
    teacher_steps: int = 50
    teacher_guidance: float = 1.0  # code w = CFG - 1
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-4  # AdamW; linear warm-up, then cosine decay to lr_min
    lr_min: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    offset_noise: float = 0.1  # the teacher's
    snr_gamma: float = 5.0  # the teacher's min-SNR-gamma weighting (0: plain MSE)
    text_dropout: float = 0.05  # rows that drop the instruction only (IP2P: 5 %)
    both_dropout: float = 0.05  # rows that drop the instruction and the source latent
    image_dropout: float = 0.05  # rows that drop the source latent only
    paraphrase: bool = True  # a random paraphrase of the instruction per row and step (False: the default one)
    ema_decay: float = 0.0  # EMA of the UNet (0: export the trained weights)
    conv_in_lr_scale: float = 1.0  # conv_in (whose source-latent channels start at zero) learns at lr x this
    validation_cases: int = 10  # per kind, for the guidance grid (0: keep IP2P's SD defaults, no grid)
    validation_seed_start: int = 900_000_000
    validation_steps: int = 20
    text_scales: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 7.5)
    image_scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    checkpoint_every: int = 250
    log_every: int = 25

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        drops = (self.text_dropout, self.both_dropout, self.image_dropout)
        if min(drops) < 0 or sum(drops) >= 1:
            raise ConfigError(f"{name}: the dropout fractions must be >= 0 and sum below 1, got {drops}")
        end = self.triple_seed_start + self.n_chunks * self.chunk
        val_end = self.validation_seed_start + len(world.EDIT_KINDS) * 1000
        if self.n_chunks < 1 or self.chunk < 1:
            raise ConfigError(f"{name}.n_chunks and chunk must be >= 1")
        if self.triple_seed_start < 0 or end > world.EVAL_SEED_START or val_end > world.EVAL_SEED_START:
            raise ConfigError(f"{name}: triple and validation seeds must lie in 0..{world.EVAL_SEED_START - 1} (the "
                              "held-out bench seeds start there)")
        if self.validation_seed_start < end and val_end > self.triple_seed_start:
            raise ConfigError(f"{name}: validation seeds {self.validation_seed_start}.. overlap the triple seeds "
                              f"{self.triple_seed_start}..{end - 1}")
        if not 0 < self.conv_in_lr_scale <= 1000:
            raise ConfigError(f"{name}.conv_in_lr_scale must lie in (0, 1000], got {self.conv_in_lr_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{name}.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not self.text_scales or not self.image_scales or not 0 <= self.validation_cases <= 1000:
            raise ConfigError(f"{name}: text_scales and image_scales must be non-empty, validation_cases in 0..1000")

    def spec(self) -> TripleSpec:
        return TripleSpec(n_chunks=self.n_chunks, chunk=self.chunk, seed_start=self.triple_seed_start,
                          steps=self.teacher_steps, guidance=self.teacher_guidance)


def dropout_masks(r: torch.Tensor, cfg: IP2PConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop the text, drop the image) per row from uniform draws `r`: [0, a) text only, [a, a + b) both,
    [a + b, a + b + c) image only (a, b, c = text_dropout, both_dropout, image_dropout), as IP2P's script."""
    a, b, c = cfg.text_dropout, cfg.both_dropout, cfg.image_dropout
    return r < a + b, (r >= a) & (r < a + b + c)


def validation_cases(cfg: IP2PConfig) -> list[world.EditCase]:
    """`validation_cases` per kind from training-range seeds (kind j from validation_seed_start + 1000 j)."""
    cases = []
    for j, kind in enumerate(world.EDIT_KINDS):
        seed, found = cfg.validation_seed_start + 1000 * j, 0
        while found < cfg.validation_cases:
            try:
                cases.append(world.make_case(kind, seed))
                found += 1
            except world.NoEditError:
                pass
            seed += 1
    return cases


def guidance_grid(model: ip2p.IP2PModel, base, cases, cfg: IP2PConfig, *, judge: JudgeScorer) -> list[dict]:
    """GT PSNR, background PSNR and judge accuracy of every (s_T, s_I) on `cases` (one batch per kind)."""
    rows = []
    for s_t in cfg.text_scales:
        for s_i in cfg.image_scales:
            gt, bg, ok = [], [], []
            for kind in world.EDIT_KINDS:
                part = [c for c in cases if c.kind == kind]
                z0 = base.encode_images(np.stack([c.source for c in part]))
                record = ip2p.encode(base, z0, [c.source_prompt for c in part], steps=cfg.validation_steps, seed=0)
                edited, _ = ip2p.edit(model, base, record, [c.target_prompt for c in part],
                                      controls=ip2p.IP2PControls(text_guidance=s_t, image_guidance=s_i))
                gt += list(psnr(np.stack([c.target for c in part]), edited))
                bg += list(psnr(np.stack([c.source for c in part]), edited, ~np.stack([c.mask for c in part])))
                ok += [r == world.parse_caption(c.target_prompt) for r, c in zip(judge.read(edited), part)]
            rows.append({"text_guidance": s_t, "image_guidance": s_i, "gt_psnr": round(float(np.mean(gt)), 3),
                         "bg_psnr": round(float(np.mean(bg)), 3), "judge_accuracy": round(float(np.mean(ok)), 4)})
            log.info("guidance s_T %g s_I %g: %s", s_t, s_i, rows[-1])
    return rows


def _training_seconds(out: Path) -> float:
    """The "seconds" of log.csv's last row: training time summed over resumed sessions."""
    with open(out / "log.csv", newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    return float(rows[-1][-1]) if rows else 0.0


class IP2PTrainer(Trainer):
    name, columns, throughput = "ip2p", ("loss", "mse", "lr"), True

    def load(self) -> None:
        # a heavy import kept inside: the pipeline (every method) is needed only to generate the triples
        from icd.pipeline import Pipeline

        cfg = self.cfg
        pipe = Pipeline.from_pretrained(cfg.model, device=self.sync.device)
        self.teacher = pipe.base()
        triples_dir = Path(cfg.triples_dir) if cfg.triples_dir else self.out / "triples"
        if self.sync.is_main:  # one process generates (resumable chunks); the others wait, then read
            self.dataset = generate_triples(pipe, triples_dir, cfg.spec())
        self.sync.barrier()
        self.data = load_triples(triples_dir, cfg.spec())
        if self.sync.is_main:
            log.info("IP2P triples: %d kept of %d generated", len(self.data), self.dataset["generated"])

    def build(self) -> Parts:
        cfg, device = self.cfg, self.sync.device
        unet = self.unet = ip2p.widen_unet(self.teacher.unet).to(device).train().requires_grad_(True)
        with tempfile.TemporaryDirectory() as scratch:  # the main process alone writes <out_dir>/tokenizer
            self.tokenizer, text_encoder, new_ids = ip2p.extend_text_encoder(
                self.teacher.tokenizer, self.teacher.text_encoder, vocabulary(),
                self.out / "tokenizer" if self.sync.is_main else scratch)
        text_encoder = self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        rows = text_encoder.get_input_embeddings().weight
        rows.requires_grad_(True)
        frozen = torch.ones(rows.shape[0], 1, device=rows.device)
        frozen[new_ids] = 0.0
        rows.register_hook(lambda g: g * frozen)  # only the instruction words' rows learn
        conv_in = list(unet.conv_in.parameters())
        rest = [p for p in unet.parameters() if all(p is not q for q in conv_in)]
        opt = torch.optim.AdamW([{"params": rest, "weight_decay": cfg.weight_decay},
                                 {"params": conv_in, "weight_decay": cfg.weight_decay,
                                  "lr_scale": cfg.conv_in_lr_scale},
                                 {"params": [rows], "weight_decay": 0.0}], lr=cfg.lr)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        ema = EMA(cfg.ema_decay, {"ema_unet": unet}) if cfg.ema_decay > 0 else None
        clipped = list(unet.parameters())  # the UNet's gradient is clipped; the embedding rows' is not
        return Parts({"unet": unet, "text_encoder": text_encoder},
                     [Update("ip2p", opt, [*clipped, rows], clip=clipped)], ema)

    def lr(self, step: int) -> float:
        return warmup_lr(step, self.cfg)

    def batch(self, step: int, rows: torch.Tensor) -> dict:
        cfg, data, b = self.cfg, self.data, self.cfg.batch_size
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(len(data), (b,), generator=gen)
        t = torch.randint(0, self.teacher.schedule.num_timesteps, (b,), generator=gen)
        eps = teacher_noise((b, *data.target.shape[1:]), cfg.offset_noise, gen)
        drop_text, drop_image = dropout_masks(torch.rand(b, generator=gen), cfg)
        words = np.random.default_rng([cfg.seed, step])
        texts = ["" if drop_text[k] else data.instruction(i, words if cfg.paraphrase else None)
                 for k, i in enumerate(idx.tolist())]
        idx, t, eps, drop_image = idx[rows], t[rows], eps[rows], drop_image[rows]  # this process's rows
        ids = self.tokenizer([texts[k] for k in rows.tolist()], padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        image = torch.where(drop_image[:, None, None, None], torch.zeros_like(data.source[idx]), data.source[idx])
        device = self.sync.device
        return {"z0": data.target[idx].to(device), "ids": ids.to(device), "t": t.to(device), "eps": eps.to(device),
                "image": image.to(device)}

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return diffusion_loss(self.unet, self.text_encoder, batch["z0"], batch["ids"], t=batch["t"], eps=batch["eps"],
                              schedule=self.teacher.schedule, snr_gamma=self.cfg.snr_gamma, condition=batch["image"])

    def export(self) -> Path:  # the EMA weights when ema_decay > 0 (the scaffold copied them into the UNet)
        cfg, out = self.cfg, self.out
        unet, tokenizer, text_encoder = self.unet.eval(), self.tokenizer, self.text_encoder
        settings = {"format": "icd-ip2p/1", "base_model": str(cfg.model), "vocabulary": vocabulary(),
                    "added_words": list(INSTRUCTION_WORDS), "text_guidance": ip2p.DEFAULT_TEXT_GUIDANCE,
                    "image_guidance": ip2p.DEFAULT_IMAGE_GUIDANCE, "guidance_choice": "IP2P's SD defaults (no grid)",
                    "dataset": self.dataset,
                    "training": {"steps": cfg.steps, "batch_size": cfg.batch_size, "triples": len(self.data),
                                 "seconds": _training_seconds(out), "threads": torch.get_num_threads(),
                                 "processes": self.sync.world, "device": self.sync.device.type}}
        if cfg.validation_cases:
            t0 = time.perf_counter()
            model = ip2p.IP2PModel(unet=unet, tokenizer=tokenizer, text_encoder=text_encoder, settings=settings,
                                   counter=NFECounter())
            grid = guidance_grid(model, self.teacher, validation_cases(cfg), cfg, judge=JudgeScorer.load(None))
            best = max(grid, key=lambda r: (r["gt_psnr"], r["judge_accuracy"]))
            n_cases = len(world.EDIT_KINDS) * cfg.validation_cases
            settings |= {"text_guidance": best["text_guidance"], "image_guidance": best["image_guidance"],
                         "guidance_choice": f"best GT PSNR of the grid on {n_cases} validation cases (seeds from "
                         f"{cfg.validation_seed_start}) at {cfg.validation_steps} steps",
                         "guidance_grid": grid, "grid_seconds": round(time.perf_counter() - t0, 1)}
        with atomic_directory(out / "final") as tmp:
            ip2p.save_folder(tmp, unet=unet, tokenizer=tokenizer, text_encoder=text_encoder, settings=settings)
        return out / "final"


def train_ip2p(cfg: IP2PConfig, *, resume: bool = True) -> Path:
    return run_training(IP2PTrainer(cfg), resume=resume)
