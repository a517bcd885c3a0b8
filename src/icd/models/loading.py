"""Loading models: the embedded tiny model, a diffusers pipeline folder or hub id of either family, a guidance-
distilled UNet, and iCD adapters in our format or the authors' released one.

- `load_model(model)`: the pipeline with its original UNet (the DDIM / NPI / NTI baselines). The family (SD 1.5,
  SDXL, FLUX or SD3: `icd.models.sd15` / `sdxl` / `flux` / `sd3`) comes from ``model_index.json``; a flow family
  (``KIND = "flow"``) loads through its module's own `load`.
- `load_icd_model(model, unet=..., lora_forward=..., lora_reverse=... | adapters=...)`: the same pipeline around the
  guidance-distilled UNet (``--unet``, default ``<model>/unet_guidance``) with both iCD adapters; ``model.icd`` holds
  their boundaries and τ. Our adapters are ``<model>/icd`` (``rev_cd.safetensors``, ``fwd_cd.safetensors``,
  ``adapters.json``); released files are read by `icd.models.released`.
- A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) is looked up in the local Hugging Face cache, and
  downloaded where the hub can be reached; offline with nothing cached, one line says what to download.

Weights are read from safetensors only, except a plain UNet state dict in a ``.pt`` file, which is read with
``torch.load(weights_only=True)`` (tensors only, no code).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from icd.boundaries import PRESETS, Boundaries
from icd.io import read_json
from icd.models import flux, lora, sd3, sd15, sdxl
from icd.models.base import ICDSpec, LatentDiffusion
from icd.models.released import ReleasedLoraError, load_released
from icd.models.tiny import VOCABULARY_FILE
from icd.paths import EMBEDDED, EMBEDDED_FLOW, embedded_flow_model_path, embedded_model_path
from icd.schedule import NoiseSchedule

log = logging.getLogger(__name__)

GUIDANCE_UNET = "unet_guidance"  # subfolder of the guidance-distilled UNet (docs/method.md §6)
ADAPTERS_SUBFOLDER = "icd"  # subfolder of the iCD adapters inside a pipeline folder
FAMILIES = {sd15.PIPELINE_CLASS: sd15, sdxl.PIPELINE_CLASS: sdxl, flux.PIPELINE_CLASS: flux, sd3.PIPELINE_CLASS: sd3}
UNET_COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")  # a family without its own list
BOUNDARY_TAU = {"4step-1": 0.8, "4step-2": 0.7, "3step": 0.7}  # τ released with each boundary set (docs/method.md §3)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["ADAPTERS_SUBFOLDER", "GUIDANCE_UNET", "ICDSpec", "ModelError", "embedded_model_path", "load_icd_model",
           "load_model", "load_unet", "resolve_model_path"]


class ModelError(ValueError):
    """A model folder that is missing, incomplete or of an unsupported kind."""


def _first_line(e: BaseException) -> str:
    """The first line of a library's (often multi-line) error message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_hub(name: str, *, what: str) -> Path:
    """A local folder for a hub id: the Hugging Face cache, or a download where the hub can be reached."""
    from huggingface_hub import snapshot_download  # only for hub ids: local folders never import the hub client

    try:
        return Path(snapshot_download(name, local_files_only=_offline(),
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as e:  # the hub client raises many kinds (offline, not found, no access, HTTP)
        why = "nothing is cached and the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else _first_line(e)
        raise ModelError(f"{what} {name!r} is not a local folder and cannot be fetched: {why}; download it where you "
                         f"are online (`hf download {name}`) and pass its folder") from None


SHIPPED = {EMBEDDED: embedded_model_path, EMBEDDED_FLOW: embedded_flow_model_path}  # names of the shipped models


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The pipeline folder of "embedded" / "embedded-flow", a local diffusers folder, or a hub id; ModelError if it
    is not one (or lacks a component its family needs)."""
    name = str(name_or_path)
    path = SHIPPED[name]() if name in SHIPPED else Path(name_or_path)
    if not path.exists() and name not in SHIPPED and _HUB_ID.match(name):
        path = resolve_hub(name, what="model")
    if not path.is_dir():
        hint = f" (the {name} model is missing from this installation)" if name in SHIPPED else ""
        raise ModelError(f"model folder not found: {path}{hint}")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"not a diffusers pipeline folder (no model_index.json): {path}")
    components = getattr(family_of_folder(path), "COMPONENTS", UNET_COMPONENTS)
    missing = [c for c in components if not (path / c).is_dir()]
    if missing:
        raise ModelError(f"model folder {path} lacks component(s): {', '.join(missing)}")
    return path


def _index(path: Path) -> dict:
    try:
        index = read_json(path / "model_index.json")
    except ValueError as e:
        raise ModelError(f"{path / 'model_index.json'}: {e}") from None
    if not isinstance(index, dict):
        raise ModelError(f"{path / 'model_index.json'}: expected a JSON object")
    if index.get("_class_name") not in FAMILIES:
        raise ModelError(f"unsupported pipeline {index.get('_class_name')!r} in {path} "
                         f"(supported: {', '.join(FAMILIES)})")
    return index


def family_of_folder(path: Path):
    """The family module of a pipeline folder, from its ``model_index.json`` (ModelError for another pipeline)."""
    return FAMILIES[_index(path)["_class_name"]]


def model_kind(name_or_path: str | Path) -> str:
    """The kind ("vp" or "flow") of the model a name or folder selects, read from its ``model_index.json`` (no
    weights loaded)."""
    return getattr(family_of_folder(resolve_model_path(name_or_path)), "KIND", "vp")


def family_of(model: LatentDiffusion):
    """The family module (`icd.models.sd15`, `sdxl`, `flux` or `sd3`) of a loaded model (`LatentDiffusion.family`)."""
    return {"sdxl": sdxl, "flux": flux, "sd3": sd3}.get(model.family, sd15)


# ---------------------------------------------------------------------------------------------- UNets
# diffusers' message for a weight whose shape differs from the one its config builds
_SHAPE_MISMATCH = re.compile(r"(\S+) expected shape torch\.Size\(\[([^\]]*)\]\), but got torch\.Size\(\[([^\]]*)\]\)")


def unet_folder(path: Path, *, dtype: torch.dtype) -> UNet2DConditionModel:
    """A diffusers UNet folder (``diffusion_pytorch_model.safetensors``, or only its ``.fp16`` variant)."""
    only_fp16 = (path / "diffusion_pytorch_model.fp16.safetensors").is_file() and not (
        path / "diffusion_pytorch_model.safetensors").is_file()
    try:  # safetensors only: a downloaded folder's pickles are never unpickled
        unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True,
                                                    variant="fp16" if only_fp16 else None)
    except (OSError, ValueError, RuntimeError) as e:
        mismatch = _SHAPE_MISMATCH.search(str(e))
        if mismatch:  # diffusers' own advice (low_cpu_mem_usage=False, a URL) is not for a user of this folder
            name, want, got = mismatch.groups()
            raise ModelError(f"{path}: its config.json and its weights disagree (the config makes {name} "
                             f"[{want}], the weights hold [{got}]): use the config.json saved with these weights"
                             ) from None
        raise ModelError(f"cannot load the model in {path}: {_first_line(e)}") from None
    empty = [n for n, p in unet.named_parameters() if p.is_meta]
    if empty:  # diffusers leaves weights the file lacks uninitialised, on the meta device
        raise ModelError(f"cannot load the model in {path}: its weights lack {len(empty)} tensors (e.g. {empty[0]})")
    return unet


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never code
        else:
            raise ModelError(f"{path}: a UNet file must be .safetensors or .pt (a state dict)")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path}: not a readable UNet state dict ({_first_line(e)})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a UNet state dict (a mapping of names to tensors)")
    for prefix in ("module.", "unet.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_unet(spec: str | Path, *, base_config: dict, dtype: torch.dtype) -> UNet2DConditionModel:
    """A guidance-distilled UNet: a diffusers UNet folder, a hub id, or a state-dict file applied to the pipeline's
    UNet config (`base_config`) with the file's time-conditioning projection (``time_embedding.cond_proj``)."""
    path = Path(spec)
    if not path.exists() and _HUB_ID.match(str(spec)):
        path = resolve_hub(str(spec), what="UNet")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a diffusers UNet folder (no config.json)")
        unet = unet_folder(path, dtype=dtype)
    elif path.is_file():
        state = _state_dict(path)
        proj = state.get("time_embedding.cond_proj.weight")
        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        config["time_cond_proj_dim"] = None if proj is None else int(proj.shape[1])
        unet = UNet2DConditionModel.from_config(config)
        result = unet.load_state_dict(state, strict=False)
        bad = [f"unexpected {k!r}" for k in result.unexpected_keys] + [f"missing {k!r}" for k in result.missing_keys]
        if bad:
            raise ModelError(f"{path}: the state dict does not fit the pipeline's UNet ({len(bad)} keys; first: "
                             f"{bad[0]})")
        unet = unet.to(dtype)
    else:
        raise ModelError(f"UNet not found: {spec}")
    if unet.config.time_cond_proj_dim is None:
        raise ModelError(f"{spec}: not a guidance-distilled UNet (no time_cond_proj_dim / cond_proj): iCD needs one "
                         "(docs/stable-diffusion.md)")
    return unet


# ---------------------------------------------------------------------------------------------- pipelines
def _build(path: Path, unet: UNet2DConditionModel, *, dtype: torch.dtype, device, name: str) -> LatentDiffusion:
    """The family's model around `unet`, on `device`."""
    index = _index(path)
    family = FAMILIES[index["_class_name"]]
    try:
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        schedule = NoiseSchedule.from_scheduler_config(scheduler)
        if family is sdxl:
            model = sdxl.load(path, dtype=dtype, unet=unet, index=index, schedule=schedule, name=name)
        else:
            vocabulary_file = path / VOCABULARY_FILE  # a closed-vocabulary model: prompts are checked against it
            vocabulary = json.loads(vocabulary_file.read_text()) if vocabulary_file.is_file() else None
            model = sd15.load(path, dtype=dtype, unet=unet, vocabulary=vocabulary, schedule=schedule, name=name)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the model in {path}: {_first_line(e)}") from None
    for module in (model.text_encoder, getattr(model, "text_encoder_2", None), model.vae, model.unet):
        if module is not None:
            module.to(device)
    return model


def load_model(name_or_path: str | Path = EMBEDDED, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, unet_subfolder: str | None = None) -> LatentDiffusion:
    """A latent diffusion model from a diffusers folder or hub id ("embedded" = the shipped tiny model).
    unet_subfolder: the folder's network to load (default the family's own, ``unet`` or ``transformer``; e.g. the
    guidance-distilled ``unet_guidance`` / ``transformer_guidance``)."""
    path = resolve_model_path(name_or_path)
    family = family_of_folder(path)
    subfolder = unet_subfolder or family.DENOISER
    if getattr(family, "KIND", "vp") == "flow":  # a flow family (FLUX, SD3) loads through its own `load`
        return _build_flow(family, path, dtype=dtype, device=device, name=str(name_or_path), subfolder=subfolder)
    unet = unet_folder(path / subfolder, dtype=dtype)
    return _build(path, unet, dtype=dtype, device=device, name=str(name_or_path))


def guidance_subfolder(name_or_path: str | Path) -> str:
    """The subfolder of a pipeline folder's guidance-distilled network: ``unet_guidance`` for the UNet families,
    ``transformer_guidance`` for the flow ones, and ``transformer`` itself for a FLUX transformer that already embeds
    its guidance (FLUX.1-dev: nothing to distil) when the folder has no distilled copy."""
    path = resolve_model_path(name_or_path)
    family = family_of_folder(path)
    if not (path / family.GUIDANCE_SUBFOLDER).is_dir() and (_embeds_guidance(path / family.DENOISER)
                                                            or inverts_own_network(path / ADAPTERS_SUBFOLDER)):
        return family.DENOISER
    return family.GUIDANCE_SUBFOLDER


def inverts_own_network(adapters: Path) -> bool:
    """Whether the adapters folder `adapters` holds a forward adapter alone, for the model's own network as the
    reverse model (``"reverse": "model"``: a few-step generator such as FLUX.1-schnell, no guidance-distilled copy);
    False when it has none or cannot be read (its loading then says why)."""
    try:
        return lora.REVERSE not in lora.adapter_names(read_json(adapters / "adapters.json"))
    except (OSError, ValueError, AttributeError):
        return False


def _embeds_guidance(folder: Path) -> bool:
    """Whether the network in `folder` takes a guidance scale as an input (its config, or an SD3 guidance embedder
    beside it: `sd3.EMBEDDER_FILE`; False when unreadable)."""
    if (folder / sd3.EMBEDDER_FILE).is_file():
        return True
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("guidance_embeds") or config.get("time_cond_proj_dim"))


def _build_flow(family, path: Path, *, dtype: torch.dtype, device, name: str, subfolder: str | None = None
                ) -> LatentDiffusion:
    """A flow family's model (`family.load`: `icd.models.flux`, `icd.models.sd3`) on `device`, its network read from
    ``<path>/<subfolder>`` (default the family's own)."""
    try:
        model = family.load(path, dtype=dtype, name=name, subfolder=subfolder or family.DENOISER)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"cannot load the model in {path}: {_first_line(e)}") from None
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "unet"):
        module = getattr(model, attr, None)  # SD3 without T5: None
        if module is not None:
            module.to(device)
    return model


def base_unet(path: Path, *, dtype: torch.dtype, device):
    """The original network of a pipeline folder (the baselines' UNet, or a flow model's transformer)."""
    family = family_of_folder(path)
    if getattr(family, "KIND", "vp") == "flow":
        return family.denoiser(path, dtype=dtype).to(device)
    return unet_folder(path / "unet", dtype=dtype).to(device)


def load_icd_model(name_or_path: str | Path = EMBEDDED, *, unet: str | Path | None = None,
                   adapters: str | Path | None = None, lora_forward: str | Path | None = None,
                   lora_reverse: str | Path | None = None, boundaries: Boundaries | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   fuse: bool = True, require_adapters: bool = True) -> LatentDiffusion:
    """The guidance-distilled model with both iCD adapters attached (see the module docstring).

    unet: the distilled UNet (default ``<model>/unet_guidance``). lora_forward / lora_reverse: released files
    (both or neither); else `adapters` (default ``<model>/icd``). boundaries: override those of the files.
    fuse: fold each adapter into its own copy of the weights it modifies (`icd.models.lora.FusedAdapters`), so an
    iCD step costs one plain UNet call; False keeps peft's LoRA branches (less memory). require_adapters=False
    returns the distilled model without adapters (``model.icd`` None) when there are none."""
    path = resolve_model_path(name_or_path)
    if (lora_forward is None) != (lora_reverse is None):
        raise ModelError("pass both --lora-forward and --lora-reverse (the two directions of one iCD model)")
    if lora_forward is not None and adapters is not None:
        raise ModelError("pass either --adapters or --lora-forward / --lora-reverse, not both")
    family = family_of_folder(path)
    if getattr(family, "KIND", "vp") == "flow":  # its guidance-distilled transformer is a subfolder, never --unet
        if unet is not None:
            raise ModelError(f"--unet takes a guidance-distilled UNet; a flow model reads its distilled transformer "
                             f"from <model>/{family.GUIDANCE_SUBFOLDER}")
        subfolder = guidance_subfolder(path)  # FLUX.1-dev: its own transformer
        # FLUX.1-schnell with a forward adapter alone: its own transformer decodes, unguided
        if inverts_own_network(path / ADAPTERS_SUBFOLDER if adapters is None else Path(adapters)):
            subfolder = family.DENOISER
        elif not (path / subfolder).is_dir() or not _embeds_guidance(path / subfolder):
            raise ModelError(f"model folder {path} has no guidance-distilled transformer "
                             f"({family.GUIDANCE_SUBFOLDER}/): run `icd train guidance`")
        model = _build_flow(family, path, dtype=dtype, device=device, name=str(name_or_path), subfolder=subfolder)
    elif unet is not None:
        base_config = json.loads((path / "unet" / "config.json").read_text())
        distilled = load_unet(unet, base_config=base_config, dtype=dtype)
        model = _build(path, distilled, dtype=dtype, device=device, name=str(name_or_path))
    elif (path / GUIDANCE_UNET).is_dir():
        distilled = unet_folder(path / GUIDANCE_UNET, dtype=dtype)
        model = _build(path, distilled, dtype=dtype, device=device, name=str(name_or_path))
    else:
        raise ModelError(f"model folder {path} has no guidance-distilled UNet ({GUIDANCE_UNET}/): pass --unet "
                         "(e.g. the released sd15-cfg-distill-unet) or run `icd train guidance`")
    return attach_icd(model, path, adapters=adapters, lora_forward=lora_forward, lora_reverse=lora_reverse,
                      boundaries=boundaries, device=device, dtype=dtype, fuse=fuse,
                      require_adapters=require_adapters)


def attach_icd(model: LatentDiffusion, path: Path | None, *, adapters: str | Path | None = None,
               lora_forward: str | Path | None = None, lora_reverse: str | Path | None = None,
               boundaries: Boundaries | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, fuse: bool = True, require_adapters: bool = True
               ) -> LatentDiffusion:
    """`model` (around a guidance-distilled UNet) with both iCD adapters attached: the released LoRA files, else
    `adapters` (default ``<path>/icd``; `path` None: no default), as `load_icd_model` describes."""
    if (lora_forward is None) != (lora_reverse is None):
        raise ModelError("pass both --lora-forward and --lora-reverse (the two directions of one iCD model)")
    if lora_forward is not None and adapters is not None:
        raise ModelError("pass either --adapters or --lora-forward / --lora-reverse, not both")
    family = family_of(model)
    if lora_forward is not None:
        names = lora.ADAPTERS  # the released files are a pair
        try:
            b = load_released(model.unet, lora_forward, lora_reverse, boundaries=boundaries)
        except ReleasedLoraError as e:
            raise ModelError(str(e)) from None
        preset = next((n for n, (r, f) in PRESETS.items() if (b.reverse, b.forward) == (r, f)), None)
        model.icd = ICDSpec(path=Path(lora_reverse).parent, boundaries=b, tau=BOUNDARY_TAU.get(preset, family.TAU),
                            w_set=())
    else:
        folder = Path(adapters) if adapters is not None else None if path is None else path / ADAPTERS_SUBFOLDER
        if folder is None or not (folder / "adapters.json").is_file():
            if require_adapters or adapters is not None:
                raise ModelError(f"no iCD adapters at {folder} (adapters.json missing); train them with `icd train "
                                 "icd`, pass --adapters DIR, or --lora-forward / --lora-reverse")
            return _finish(model, device=device, dtype=dtype)
        try:
            meta = lora.attach_adapters(model.unet, folder)
            names = lora.adapter_names(meta)
            b = boundaries or Boundaries(**meta["boundaries"])
        except (KeyError, TypeError, ValueError, OSError, RuntimeError, SafetensorError) as e:
            raise ModelError(f"cannot load iCD adapters from {folder}: {_first_line(e)}") from None
        model.icd = ICDSpec(path=folder, boundaries=b, tau=meta.get("tau"), w_set=tuple(meta.get("w_set", ())),
                            reverse_adapter=lora.REVERSE in names)
    model = _finish(model, device=device, dtype=dtype)
    if fuse:
        model.fused = lora.FusedAdapters(model.unet, names)
    return model


def _finish(model: LatentDiffusion, *, device, dtype: torch.dtype) -> LatentDiffusion:
    model.unet.to(device)  # LoRA weights are created in fp32 on the CPU
    if dtype != torch.float32:  # (a no-op cast to fp32 would make diffusers warn about its fp32 modules)
        model.unet.to(dtype=dtype)
    return model
