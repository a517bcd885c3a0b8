"""``gnri``: the reverse model alone, inverted by Newton-Raphson (Samuel et al., "Lightning-Fast Image Inversion and
Editing for Text-to-Image Diffusion Models", ICLR 2025, arXiv 2312.12540: GNRI, the reference code's "RNRI";
docs/baselines.md §12).

The generator, its times and its decoding are ``renoise``'s (`icd.methods.renoise.GeneratorInversion`: the iCD
reverse adapter's deterministic jumps). One inversion step s -> t seeks the root of r(z) = InvStep(eps(z, t), z_s) - z
with a prior keeping z plausible. Per element, the objective is

    f(z) = |r(z)| + alpha * 0.5 * ((InvStep(eps(z, t), z_s) - alpha_t z0) / sigma_t)^2,

the second term the negative log-density of the forward process q(z_t | z0) (the reference writes it with the
Euler (VE) sigma, z_t = z0 + sigma z; for the VP latents here that is alpha_t z0 + sigma_t z). The reference's
Newton step on sum(f) with the network call outside the gradient (its ``inversion_step``) has the derivative
-sign(r) per element, so the update is z <- z + mean(f) * sign(r) (per image; the reference divides by 64 * 64 * 4,
its latent's size). Each iteration costs one call; the iterate InvStep(eps(z, t), z_s) with the lowest mean(f) is
the step's result.

Defaults: the reference code's (dvirsamuel/NewtonRaphsonInversion ``main.py``: ``inv_hp = [2, 0.1, 0.2]``):
2 iterations per step, alpha = 0.1 (the third value is unused there), the generator's 4 steps, inversion guidance
0: 8 inversion calls + 4 decoding calls. Two deviations: the reference samples with SDXL-Turbo's Euler-ancestral
sampler on a fixed noise list and inverts from ``inversion_max_step`` 0.6 (its last 2 of 4 steps); here the
generator's jumps are deterministic (no noise list) and the whole schedule is inverted, so every method starts from
T-1. ``gnri-4call``: one iteration per step (4 + 4 calls).
"""

from __future__ import annotations

import torch

from icd.methods.base import Settings
from icd.methods.renoise import GeneratorInversion, inv_step
from icd.models.base import Cond, EpsFn
from icd.schedule import NoiseSchedule


class GNRI(GeneratorInversion):
    iterations = 2  # inv_hp[0]
    alpha = 0.1  # inv_hp[1]: the prior's weight

    def __init__(self, **options):
        """Override the reference's defaults for one object (tests, ablations): `iterations`, `alpha`."""
        for key, value in options.items():
            if key not in ("iterations", "alpha"):
                raise TypeError(f"GNRI: unknown option {key!r}; choose from iterations, alpha")
            setattr(self, key, value)

    def record_settings(self, st: Settings) -> dict:
        return {"gnri_iterations": self.iterations, "gnri_alpha": self.alpha}

    def step(self, eps: EpsFn, z_s: torch.Tensor, s: int, t: int, *, cond: Cond, index: int, z0: torch.Tensor,
             schedule: NoiseSchedule, seed: int) -> torch.Tensor:
        a_t, s_t = schedule.alpha_sigma(t)
        mean_t = float(a_t) * z0.float()
        z, best, best_score = z_s, None, None
        for _ in range(self.iterations):
            nxt = inv_step(eps(z, t, cond), z_s, s, t, schedule=schedule)
            r = nxt.float() - z.float()
            f = r.abs() + self.alpha * 0.5 * ((nxt.float() - mean_t) / float(s_t)) ** 2
            score = f.flatten(1).mean(dim=1)
            if best is None:
                best, best_score = nxt.clone(), score
            else:
                better = score < best_score
                best[better], best_score = nxt[better], torch.where(better, score, best_score)
            z = (z.float() + score.view(-1, *[1] * (r.ndim - 1)) * torch.sign(r)).to(z_s.dtype)
        return best


class GNRI4Call(GNRI):
    iterations = 1
