"""``icd``: invertible consistency distillation (docs/method.md §8). The forward adapter encodes (one jump per
segment up from the first forward boundary, noised there with seeded noise), the reverse adapter decodes (one jump
per segment down); both on the guidance-distilled UNet, guidance an input with dynamic CFG (τ: the adapters')."""

from __future__ import annotations

import torch

from icd.editing.inversion import Inversion
from icd.methods.base import Host, Method, Settings
from icd.models import lora
from icd.models.base import Cond, EpsFn, LatentDiffusion
from icd.samplers import StopFn, icd_decode, icd_invert, initial_noise, stoppable


class AdapterMethod(Method):
    """A method on the guidance-distilled UNet with the iCD adapters: the adapters' step count and τ, the reverse
    adapter decodes, guidance is an input (sources unguided, targets at their codes)."""

    unet = "icd"
    own_steps = True
    p2p_defaults = dict(cross_replace=0.3, self_replace=0.6, reweight_new_words=4.0)  # the official iCD launch

    def resolve_steps(self, host: Host, steps: int | None) -> int:
        icd = self.model(host).icd
        segments = icd.boundaries.num_segments
        if steps not in (None, segments):
            raise ValueError(f"the iCD adapters at {icd.path} take {segments} steps, not {steps} (--steps); other "
                             "step counts need adapters trained with other boundaries")
        return segments

    def default_tau(self, host: Host, task: str) -> float | None:
        return self.model(host).icd.tau

    def own_generator(self, host: Host) -> bool:
        """Whether the model's own network decodes (adapters with ``"reverse": "model"``: FLUX.1-schnell)."""
        icd = self.model(host).icd
        return icd is not None and not icd.reverse_adapter

    def guidance_default(self, host: Host, task: str) -> float:
        if self.own_generator(host):
            return 0.0  # a generator distilled without guidance
        return super().guidance_default(host, task)

    def settings(self, host: Host, task: str, **kw) -> Settings:
        if self.own_generator(host) and kw.get("renoise") is None:
            kw["renoise"] = 0.0  # the generator's own deterministic steps (schnell's Euler), not re-noised jumps
        st = super().settings(host, task, **kw)
        if st.guidance and self.own_generator(host):
            raise ValueError(f"guidance (--guidance) must be 0 here, got {st.guidance:g}: the model's own network "
                             "decodes (a few-step generator distilled without guidance, e.g. FLUX.1-schnell)")
        return st

    def decoder_eps(self, model: LatentDiffusion, *, guidance, tau: float | None, uncond=None) -> EpsFn:
        if not model.icd.reverse_adapter:  # the generator itself, one unguided call per step (codes are all 0)
            return model.eps_fn()
        return model.eps_fn(adapter=lora.REVERSE, guidance=guidance, tau=tau)

    def edit_eps(self, model: LatentDiffusion, inversion: Inversion, st: Settings, *, cond_src: Cond,
                 source_of: torch.Tensor, n_targets: int) -> EpsFn:
        w = torch.full((n_targets,), float(st.guidance))
        return self.decoder_eps(model, guidance=torch.cat([torch.zeros(len(cond_src)), w]), tau=st.tau)


class ICD(AdapterMethod):
    renoises = True

    def encoder_eps(self, model: LatentDiffusion) -> EpsFn:
        return model.eps_fn(adapter=lora.FORWARD)

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        noise = initial_noise(z0.shape[1:], [st.seed] * z0.shape[0], z0.device)
        cond = model.encode_prompt(prompts)
        timesteps, latents = icd_invert(stoppable(self.encoder_eps(model), should_stop), z0, cond,
                                        model.icd.boundaries, schedule=model.schedule, noise=noise)
        return Inversion(latents=latents, timesteps=timesteps, prompts=prompts, method=self.name,
                         settings={"seed": st.seed})

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (seed,)  # the encoding noise

    def decode_timesteps(self, model: LatentDiffusion, inversion: Inversion) -> list[int]:
        return model.icd.boundaries.reverse_schedule()

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        if list(inversion.timesteps) != model.icd.boundaries.forward_schedule():
            raise ValueError(f"this inversion's times {list(inversion.timesteps)} are not these adapters' "
                             f"{model.icd.boundaries.forward_schedule()}: invert again with them")
        super().check_inversion(model, inversion)

    def generate_latents(self, model: LatentDiffusion, eps: EpsFn, noise, cond: Cond, *, st: Settings
                         ) -> torch.Tensor:
        """The reverse jumps T-1 -> ... -> 0, re-noised with `noise()`'s later draws when `st.renoise` > 0."""
        return icd_decode(eps, noise(), cond, model.icd.boundaries, schedule=model.schedule, renoise=st.renoise,
                          fresh_noise=noise)
