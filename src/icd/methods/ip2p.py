"""``ip2p``: InstructPix2Pix trained on the teacher's P2P triples (`icd.editing.ip2p`): an instruction and the source
latent, two-way CFG, K DDIM steps from t = 999. "Inversion" only VAE-encodes the source (0 UNet calls) and keeps the
seeded start noise; the edit needs the weights folder (``<model>/ip2p`` or ``ip2p=DIR``: `Host.ip2p_model`)."""

from __future__ import annotations

import torch

from icd.editing import ip2p
from icd.editing.inversion import Inversion
from icd.methods.base import Host, Method, Settings, with_extra
from icd.models.base import LatentDiffusion
from icd.samplers import StopFn


class IP2P(Method):
    default_steps = ip2p.DEFAULT_STEPS
    controls_type = ip2p.IP2PControls
    bench_guidance = False  # a benchmark runs it at its weights' validated scales, not the run's code

    def prepare(self, host: Host) -> None:
        host.ip2p_model()

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        return ip2p.encode(model, z0, prompts, steps=st.steps, seed=st.seed)

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (seed,)  # the sampler's start noise

    def inversion_steps(self, inversion: Inversion) -> int:
        return inversion.settings.get("steps")

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        ip2p.check_record(inversion, model)

    def decode(self, host: Host, inversion: Inversion, st: Settings, *, should_stop: StopFn | None
               ) -> torch.Tensor:
        """IP2P conditions on the source latent: the record holds it."""
        return inversion.latents[0]

    def check_controls(self, controls):
        if controls is None:
            return ip2p.IP2PControls()
        if not isinstance(controls, ip2p.IP2PControls):
            raise ValueError("an IP2P edit takes IP2PControls (an instruction and two guidance scales), no attention "
                             "control")
        return controls

    def controls(self, *, guidance: float | None = None, tau: float | None = None, p2p=None, masactrl=None,
                 instruction: str | None = None, image_guidance: float | None = None, **options):
        """IP2PControls: the instruction, s_I, and s_T = w + 1 from the guidance code `guidance`."""
        if tau is not None:
            raise ValueError("ip2p takes no tau (its two guidance scales are constant)")
        if p2p is not None or masactrl is not None:
            raise ValueError("ip2p takes no attention control")
        super().controls(**options)  # anything else is another method's
        return ip2p.IP2PControls(instruction=instruction, image_guidance=image_guidance,
                                 text_guidance=None if guidance is None else guidance + 1.0)

    def edit(self, host: Host, inversion: Inversion, target_prompts, controls, *, should_stop: StopFn | None):
        """The instruction-conditioned sampler, no controller; the reconstructions are the VAE round trip."""
        controls = self.check_controls(controls)
        model = self.model(host)
        weights = host.ip2p_model()
        images, recon = ip2p.edit(weights, model, inversion, target_prompts, controls=controls,
                                  should_stop=should_stop)
        s_t, s_i = weights.guidance(controls)
        sources = list(inversion.prompts)
        targets = [target_prompts] if isinstance(target_prompts, str) else target_prompts
        instructions = [ip2p.instruction_of(sources[i], t, controls.instruction)
                        for i, entry in enumerate(targets) for t in ([entry] if isinstance(entry, str) else entry)]
        st = Settings(method=self.name, task="edit", guidance=s_t - 1.0, tau=None,
                      steps=self.inversion_steps(inversion), renoise=0.0, seed=inversion.settings.get("seed"))
        instruction = instructions[0] if len(instructions) == 1 else instructions
        return images, recon, with_extra(st, control="none", instruction=instruction, text_guidance=s_t,
                                         image_guidance=s_i)
