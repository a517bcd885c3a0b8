"""InstructPix2Pix training triples made by our own teacher (Brooks et al. 2023, §3.1, on the shapes world).

IP2P's data is (source image, instruction, edited image) where both images are *generated*: Stable Diffusion with
Prompt-to-Prompt draws the pair from one noise, and a CLIP filter keeps the pairs that show their captions. Here:

1. caption pairs from `icd.world.make_case(kind, seed)` on training seeds (below `world.EVAL_SEED_START`: the
   held-out bench seeds are never touched), kinds color / shape / background / size in turn, one kind per chunk;
2. source and target generated *from seeded noise at t = 999* by the teacher (the original UNet, two-pass CFG at
   w = 1, DDIM 50 steps): an `Inversion`-like record whose noise is that draw is decoded by `Pipeline.edit` on
   [source, target] with the bench's DDIM controls (`edit_controls`: P2P word swap with local blend and reweight;
   MasaCtrl for size), so the P2P code is the one the bench runs. World renders are never used as data;
3. the filter: the world judge (`icd.judge.JudgeScorer`, our stand-in for CLIP) must read the source caption on
   the source image and the target caption on the target image; the kept fraction is recorded;
4. the kept images are VAE-encoded (the latents an edit at inference sees: encode(image)) and written per chunk:
   ``chunk-NNNNN.safetensors`` (``source``, ``target``: [k, 4, 16, 16]) and ``chunk-NNNNN.json`` (the captions, kind,
   seeds, default instructions, the judge's verdicts, seconds), each atomically (temporary file + rename); the JSON
   is written last and marks a chunk done, so an interrupted run resumes at the first missing chunk.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from icd import world
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.editing.instructions import instruction
from icd.editing.inversion import Inversion
from icd.io import read_json, save_safetensors_atomic, write_text_atomic
from icd.judge import JudgeScorer
from icd.samplers import initial_noise, inversion_timesteps

log = logging.getLogger(__name__)

KINDS = world.EDIT_KINDS
# the bench's DDIM row settings (icd.bench.editing.P2P_SETTINGS["ddim"], NPI's paper); tests/test_ip2p.py holds
# edit_controls equal to icd.bench.editing.controls_for("ddim", ...) (training may not import the bench)
DDIM_P2P = dict(cross_replace=0.2, self_replace=0.5, reweight_new_words=3.0)
NON_RIGID = frozenset({"size"})


@dataclass(frozen=True)
class TripleSpec:
    """What a triple set is made of: `n_chunks` chunks of `chunk` caption pairs from seed `seed_start` on."""

    n_chunks: int
    chunk: int = 32
    seed_start: int = 0
    steps: int = 50  # teacher DDIM steps
    guidance: float = 1.0  # teacher CFG code w (CFG 2: the embedded world's best)

    def seeds(self, c: int) -> list[int]:
        start = self.seed_start + c * self.chunk
        return list(range(start, start + self.chunk))

    def kind(self, c: int) -> str:
        return KINDS[c % len(KINDS)]

    def check(self) -> None:
        last = self.seed_start + self.n_chunks * self.chunk
        if self.seed_start < 0 or last > world.EVAL_SEED_START:
            raise ValueError(f"triple seeds {self.seed_start}..{last - 1} must lie below {world.EVAL_SEED_START} "
                             "(the held-out evaluation seeds)")


def edit_controls(kind: str, blend_words, *, guidance: float) -> EditControls:
    """The bench's DDIM controls for a batch of one kind: MasaCtrl for size, else P2P with local blend."""
    if kind in NON_RIGID:
        return EditControls(guidance=guidance, p2p=None, masactrl=MasaCtrlControls())
    blend = [((a,), (b,)) for a, b in blend_words]
    return EditControls(guidance=guidance, p2p=P2PControls(**DDIM_P2P, blend_words=blend))


def chunk_paths(folder: Path, c: int) -> tuple[Path, Path]:
    return folder / f"chunk-{c:05d}.safetensors", folder / f"chunk-{c:05d}.json"


def world_pairs(kind: str, seeds: list[int]) -> list[world.EditCase]:
    """The edit cases of `seeds` (a seed whose scene admits no edit of `kind` is skipped)."""
    cases = []
    for s in seeds:
        try:
            cases.append(world.make_case(kind, s))
        except world.NoEditError:
            continue
    return cases


@torch.no_grad()
def generate_chunk(pipe, judge: JudgeScorer, kind: str, seeds: list[int], *, steps: int, guidance: float
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """One chunk: teacher P2P pairs from noise, judged; (latents of the kept pairs, the chunk's record)."""
    t0 = time.perf_counter()
    cases = world_pairs(kind, seeds)
    model = pipe.base()
    noise = initial_noise(model.latent_shape(), [c.seed for c in cases], model.device)
    timesteps = inversion_timesteps(steps)  # the record's times; only its last latent, the noise at 999, is read
    record = Inversion(latents=[noise] * len(timesteps), timesteps=timesteps, prompts=[c.source_prompt for c in cases],
                       method="ddim", settings={"generated_from": "noise"})
    result = pipe.edit(record, [c.target_prompt for c in cases],
                       edit_controls(kind, [c.blend_words for c in cases], guidance=guidance))
    src_read, tgt_read = judge.read(result.reconstructions), judge.read(result.images)
    src_ok = [r == world.parse_caption(c.source_prompt) for r, c in zip(src_read, cases)]
    tgt_ok = [r == world.parse_caption(c.target_prompt) for r, c in zip(tgt_read, cases)]
    keep = [i for i in range(len(cases)) if src_ok[i] and tgt_ok[i]]
    tensors = {"source": model.encode_images(result.reconstructions[keep]).contiguous() if keep else
               torch.zeros(0, *model.latent_shape()),
               "target": model.encode_images(result.images[keep]).contiguous() if keep else
               torch.zeros(0, *model.latent_shape())}
    kept = [cases[i] for i in keep]
    meta = {"format": "icd-ip2p-triples/1", "kind": kind, "seeds": [c.seed for c in kept],
            "source_captions": [c.source_prompt for c in kept], "target_captions": [c.target_prompt for c in kept],
            "instructions": [instruction(c.source_prompt, c.target_prompt, kind) for c in kept],
            "generated": len(cases), "skipped_seeds": len(seeds) - len(cases), "kept": len(kept),
            "source_ok": sum(src_ok), "target_ok": sum(tgt_ok), "nfe": result.nfe,
            "seconds": round(time.perf_counter() - t0, 2)}
    return tensors, meta


def generate_triples(pipe, folder: str | Path, spec: TripleSpec, *, progress: bool = True) -> dict:
    """Write every missing chunk of `spec` into `folder` (resumable), then ``dataset.json`` with the totals."""
    spec.check()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    judge = JudgeScorer.load(None)
    todo = [c for c in range(spec.n_chunks) if not chunk_paths(folder, c)[1].is_file()]
    for c in tqdm(todo, desc="ip2p triples", unit="chunk", disable=not progress):
        tensors, meta = generate_chunk(pipe, judge, spec.kind(c), spec.seeds(c), steps=spec.steps,
                                       guidance=spec.guidance)
        tensor_file, meta_file = chunk_paths(folder, c)
        save_safetensors_atomic(tensors, tensor_file)
        write_text_atomic(meta_file, json.dumps(meta) + "\n")
        log.info("chunk %d (%s): kept %d / %d in %.1f s", c, meta["kind"], meta["kept"], meta["generated"],
                 meta["seconds"])
    return summarize(folder, spec)


def summarize(folder: Path, spec: TripleSpec) -> dict:
    """Totals over the chunks of `spec` (generated, kept, per kind, generation seconds), written to dataset.json."""
    metas = [read_json(chunk_paths(folder, c)[1]) for c in range(spec.n_chunks)]
    per_kind = {k: {"generated": sum(m["generated"] for m in metas if m["kind"] == k),
                    "kept": sum(m["kept"] for m in metas if m["kind"] == k)} for k in KINDS}
    generated, kept = sum(m["generated"] for m in metas), sum(m["kept"] for m in metas)
    summary = {"chunks": spec.n_chunks, "chunk": spec.chunk, "seed_start": spec.seed_start, "teacher_steps": spec.steps,
               "teacher_guidance": spec.guidance, "generated": generated, "kept": kept,
               "kept_fraction": round(kept / max(generated, 1), 4), "per_kind": per_kind,
               "generation_seconds": round(sum(m["seconds"] for m in metas), 1)}
    write_text_atomic(folder / "dataset.json", json.dumps(summary, indent=1) + "\n")
    return summary


@dataclass
class Triples:
    """The kept triples in memory: latents [N, 4, h, w], captions and kinds (instructions are made from them)."""

    source: torch.Tensor
    target: torch.Tensor
    source_captions: list[str]
    target_captions: list[str]
    kinds: list[str]
    seeds: list[int]  # the world seed of each pair (its exact renders: `world.make_case(kind, seed)`)

    def __len__(self) -> int:
        return self.source.shape[0]

    def instruction(self, i: int, rng=None) -> str:
        """Pair `i`'s instruction (`icd.editing.instructions.instruction`; `rng` picks a paraphrase)."""
        return instruction(self.source_captions[i], self.target_captions[i], self.kinds[i], rng)

    def spread(self, n: int) -> list[int]:
        """`n` indices spread evenly over the set (its chunks alternate kinds, so every kind is drawn)."""
        return list(range(0, len(self), max(1, len(self) // n)))[:n]


def load_triples(folder: str | Path, spec: TripleSpec) -> Triples:
    """Every chunk of `spec` in `folder`; ValueError naming a missing or malformed chunk."""
    folder = Path(folder)
    src, tgt, s_caps, t_caps, kinds, seeds = [], [], [], [], [], []
    for c in range(spec.n_chunks):
        tensor_file, meta_file = chunk_paths(folder, c)
        if not meta_file.is_file() or not tensor_file.is_file():
            raise ValueError(f"triple chunk {c} is missing in {folder} (generate the triples first)")
        meta, tensors = read_json(meta_file), load_file(str(tensor_file))
        if meta.get("format") != "icd-ip2p-triples/1" or tensors["source"].shape[0] != meta["kept"]:
            raise ValueError(f"{meta_file}: not an icd IP2P triple chunk, or its latents do not match")
        src.append(tensors["source"])
        tgt.append(tensors["target"])
        s_caps += meta["source_captions"]
        t_caps += meta["target_captions"]
        kinds += [meta["kind"]] * meta["kept"]
        seeds += meta["seeds"]
    if not s_caps:
        raise ValueError(f"no triple in {folder} passed the judge")
    return Triples(torch.cat(src), torch.cat(tgt), s_caps, t_caps, kinds, seeds)
