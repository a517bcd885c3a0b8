"""``renoise``: the reverse model alone, inverted by ReNoise (Garibi et al., "ReNoise: Real Image Inversion Through
Iterative Noising", ECCV 2024, arXiv 2403.14602; docs/baselines.md §12).

The few-step generator is the iCD reverse adapter (on a Stable Diffusion family: the consistency-style UNet or
LoRA given as the reverse adapter), decoding with its own deterministic jumps down its boundaries
T-1 -> E_R[-1] -> ... -> E_R[1] -> 0, exactly as ``icd`` decodes; the forward adapter is never used. Inversion
visits the same times upwards, 0 -> E_R[1] -> ... -> T-1. One step s -> t solves z_t = InvStep(eps(z_t, t), z_s),
where InvStep is the generator's jump t -> s solved for its start (for the DDIM jump: the jump s -> t with the same
eps), by fixed-point iteration from z^(0) = z_s:

- **re-noising**: z^(k+1) = InvStep(eps(z^(k), t), z_s), k = 0..K (K + 1 reverse-model calls);
- **averaging**: the eps of the iterates with index in [a, b) are averaged and a last InvStep takes the mean;
- **noise regularisation** (pix2pix-zero's, applied to each eps from index a on and to the mean): 4 steps of
  gradient descent on a 4x4-patch KL term (lambda 0.065) towards eps(add_noise(z0, n*, t), t) (n*: seeded noise;
  evaluated in the same batch as k = 0, so it costs no call) and on a multiscale auto-correlation term (lambda 20,
  5 random rolls from a generator seeded with the run's seed);
- **noise correction**: the decoder's jump t -> s is x_s = alpha_s x0_hat + sigma_s n_s with the noise n_s set so
  the source lands exactly on the inverted z_s (n_s from eps(z_t, t)); an edit's target rows take their source's
  n_s. The reference code spends one call per step on eps(z_t, t) at inversion time; here it is the decoder's own
  first evaluation of the step (the source row sits at z_t), so it costs no call.

Defaults: the reference code's (garibida/ReNoise-Inversion, ``src/config.py``): the generator's 4 steps (the
adapters' segment count), ``num_renoise_steps`` K = 9 (10 calls) with averaging over iterates [8, 10), the first
step (from the clean latent) K = min(5, 9) with averaging over [0, 5), regularisation and correction on. The
reference picks the first step's setting by t < 250 (its SDXL-Turbo first step is t = 249); here it is the step from
t = 0, whichever the first boundary. NFE: 5 + 3 * 10 = 35 inversion calls + 4 decoding calls. The reference counts
40 + 4 = 44 (iCD's Table 3): it also evaluates a 6th first-step iterate that its averaging discards and the 4
correction calls above; the latents it returns are the same. ``renoise-4call`` is the reference code with
K = 0 (one call per step: 4 + 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from icd.editing.inversion import Inversion
from icd.methods.base import Host, Settings
from icd.methods.icd import AdapterMethod
from icd.models.base import Cond, EpsFn, LatentDiffusion
from icd.samplers import StopFn, ddim_loop, initial_noise, stoppable
from icd.schedule import NoiseSchedule
from icd.solver import NumericsError, ddim_jump


# ---------------------------------------------------------------------------------------------- the shared base
class GeneratorInversion(AdapterMethod):
    """The reverse model inverted step by step up its own decoding times, then decoding with it (``renoise``,
    ``gnri``): one subclass per way of solving a step (`step`)."""

    def times(self, model: LatentDiffusion) -> list[int]:
        """Inversion's ascending times: the reverse model's decoding times reversed (0 -> ... -> T-1)."""
        return list(reversed(model.icd.boundaries.reverse_schedule()))

    def step(self, eps: EpsFn, z_s: torch.Tensor, s: int, t: int, *, cond: Cond, index: int, z0: torch.Tensor,
             schedule: NoiseSchedule, seed: int) -> torch.Tensor:
        """z_t with z_s = the generator's jump t -> s of z_t (`index`: the step's place, 0 = from the clean
        latent)."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def record_settings(self, st: Settings) -> dict:
        """What the record keeps beyond the step times (the seed where the method draws noise)."""
        return {}

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        cond = model.encode_prompt(prompts)
        eps = stoppable(self.decoder_eps(model, guidance=st.guidance, tau=st.tau), should_stop)
        times = self.times(model)
        seed = 0 if st.seed is None else int(st.seed)
        latents = [z0]
        with torch.no_grad():
            for i, (s, t) in enumerate(zip(times, times[1:])):
                z = self.step(eps, latents[-1], s, t, cond=cond, index=i, z0=z0, schedule=model.schedule, seed=seed)
                if not bool(torch.isfinite(z).all()):
                    raise NumericsError(f"{self.name}: NaN/Inf latents at inversion step {i} (t = {s} -> {t})")
                latents.append(z)
        return Inversion(latents=latents, timesteps=times, prompts=prompts, method=self.name,
                         settings=self.record_settings(st))

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        if list(inversion.timesteps) != self.times(model):
            raise ValueError(f"this inversion's times {list(inversion.timesteps)} are not these adapters' "
                             f"{self.times(model)}: invert again with them")
        super().check_inversion(model, inversion)


def inv_step(eps: torch.Tensor, z_s: torch.Tensor, s: int, t: int, *, schedule: NoiseSchedule) -> torch.Tensor:
    """InvStep: the z_t whose DDIM jump t -> s with `eps` lands on `z_s` (the jump s -> t with the same eps)."""
    return ddim_jump(z_s, eps, s, t, schedule=schedule)


# ---------------------------------------------------------------------------------------------- regularisation
def patch_kl(x: torch.Tensor, y: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """|KL| between per-channel Gaussians fitted on each patch x patch tile of `x` and of `y`, summed (pix2pix-zero's
    / ReNoise's ``patchify_latents_kl_divergence``)."""
    def stats(v):
        p = v.unfold(2, patch, patch).unfold(3, patch, patch)
        p = p.reshape(*p.shape[:4], -1)
        return p.mean(-1), p.var(-1)

    tiny = 1e-6
    (m0, v0), (m1, v1) = stats(x), stats(y)
    kl = torch.log((v1 + tiny) / (v0 + tiny)) + (v0 + (m0 - m1) ** 2) / (v1 + tiny) - 1
    return kl.abs().sum()


def auto_corr(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Squared auto-correlation of each channel with itself rolled by a random shift along each axis, over a
    pyramid of 2x average pools down to 8 rows (pix2pix-zero's ``auto_corr_loss``), summed over rows."""
    loss = x.new_zeros(())
    for c in range(x.shape[1]):
        noise = x[:, c:c + 1]
        while True:
            shift = int(torch.randint(0, max(1, noise.shape[2] // 2), (1,), generator=generator))
            loss = loss + ((noise * torch.roll(noise, shift, dims=2)).mean(dim=(1, 2, 3)) ** 2).sum()
            loss = loss + ((noise * torch.roll(noise, shift, dims=3)).mean(dim=(1, 2, 3)) ** 2).sum()
            if noise.shape[2] <= 8 or noise.shape[3] < 2:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return loss


def regularise(e: torch.Tensor, target: torch.Tensor, *, lambda_kl: float, lambda_ac: float, steps: int,
               rolls: int, generator: torch.Generator) -> torch.Tensor:
    """ReNoise's ``noise_regularization``: `steps` rounds of one KL gradient step (gradient clipped to +-100) and
    `rolls` auto-correlation steps, on the eps alone (no network call)."""
    dtype = e.dtype
    e, target = e.detach().float(), target.detach().float()
    with torch.enable_grad():
        for _ in range(steps):
            if lambda_kl > 0:
                var = e.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(patch_kl(var, target), var)
                e = e - lambda_kl * grad.clamp(-100, 100)
            if lambda_ac > 0:
                for _ in range(rolls):
                    var = e.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(auto_corr(var, generator), var)
                    e = e - lambda_ac * grad / rolls
            e = e.detach()
    return e.to(dtype)


# ---------------------------------------------------------------------------------------------- noise correction
def corrected(eps: EpsFn, inversion: Inversion, schedule: NoiseSchedule, rows: torch.Tensor) -> EpsFn:
    """`eps` whose DDIM jump t -> s lands on alpha_s x0_hat + sigma_s n_s: n_s makes source i land on the inverted
    latent z_s (n_s = (z_s - alpha_s x0_hat(z_t, eps_i)) / sigma_s, eps_i: row i's own eps, the source's rows come
    first); batch row r takes source rows[r]'s n_s. The eps' that a plain DDIM jump turns into that landing is
    returned, so any DDIM loop (decoding, the edit loop) runs the corrected generator; the jump to 0 is unchanged."""
    times = [int(t) for t in inversion.timesteps]
    n_src = len(inversion)

    def eps_corrected(x: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        e = eps(x, t, cond)
        k = times.index(int(t)) if int(t) in times else -1
        if k <= 0:
            return e
        s = times[k - 1]
        a_t, s_t = (float(v) for v in schedule.alpha_sigma(int(t)))
        a_s, s_s = (float(v) for v in schedule.alpha_sigma(s))
        if s_s == 0.0:
            return e
        ef = e.float()
        z_t, z_s = inversion.latents[k].float().to(e.device), inversion.latents[k - 1].float().to(e.device)
        x0_src = (z_t - s_t * ef[:n_src]) / a_t
        n = (z_s - a_s * x0_src) / s_s
        c = a_s * s_t / a_t  # the DDIM jump's eps coefficient is sigma_s - c
        return ((s_s * n[rows.to(e.device)] - c * ef) / (s_s - c)).to(e.dtype)

    return eps_corrected


# ---------------------------------------------------------------------------------------------- ReNoise
class ReNoise(GeneratorInversion):
    iterations = 9  # num_renoise_steps K: K + 1 iterates per step
    first_iterations = 5  # max_num_renoise_steps_first_step
    average_range = (8, 10)  # average_step_range
    first_average_range = (0, 5)  # average_first_step_range
    average = True  # average_latent_estimations
    lambda_kl, lambda_ac, reg_steps, ac_rolls = 0.065, 20.0, 4, 5  # noise_regularization_*
    correction = True  # perform_noise_correction

    OPTIONS = ("iterations", "first_iterations", "average_range", "first_average_range", "average", "lambda_kl",
               "lambda_ac", "reg_steps", "ac_rolls", "correction")

    def __init__(self, **options):
        """Override the reference's defaults for one object (tests, ablations): any of `OPTIONS`."""
        for key, value in options.items():
            if key not in self.OPTIONS:
                raise TypeError(f"ReNoise: unknown option {key!r}; choose from {', '.join(self.OPTIONS)}")
            setattr(self, key, value)

    def record_settings(self, st: Settings) -> dict:
        return {"seed": st.seed, "renoise_iterations": self.iterations, "correction": self.correction}

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (seed,)  # the regularisation's noise n* and rolls

    def calls_per_step(self, index: int) -> int:
        """Reverse-model calls of inversion step `index`: K + 1 iterates, those past the averaging window skipped
        (the mean replaces their result)."""
        k = min(self.first_iterations, self.iterations) if index == 0 else self.iterations
        a, b = self.first_average_range if index == 0 else self.average_range
        return min(k + 1, b) if self.average and a < k + 1 else k + 1

    def step(self, eps: EpsFn, z_s: torch.Tensor, s: int, t: int, *, cond: Cond, index: int, z0: torch.Tensor,
             schedule: NoiseSchedule, seed: int) -> torch.Tensor:
        a, b = self.first_average_range if index == 0 else self.average_range
        reg = self.reg_steps > 0
        generator = torch.Generator().manual_seed(seed + 1000 * index)
        target_eps, mean, z = None, None, z_s
        for i in range(self.calls_per_step(index)):
            if reg and i == 0:  # the regularisation's target eps(add_noise(z0, n*, t), t), in the same batch
                n_star = initial_noise(z0.shape[1:], [seed] * len(z0), z0.device).to(z0.dtype)
                both = eps(torch.cat([schedule.add_noise(z0, n_star, t), z]), t, Cond.cat([cond, cond]))
                target_eps, e = both.chunk(2)
            else:
                e = eps(z, t, cond)
            if a <= i < b:
                j = i - a
                mean = e.clone() if mean is None else mean * (j / (j + 1)) + e / (j + 1)
            if reg and (i >= a or (not self.average and i > 0)):
                e = self.regularised(e, target_eps, generator)
            z = inv_step(e, z_s, s, t, schedule=schedule)
        if self.average and mean is not None:
            if reg:
                mean = self.regularised(mean, target_eps, generator)
            z = inv_step(mean, z_s, s, t, schedule=schedule)
        return z

    def regularised(self, e: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return regularise(e, target, lambda_kl=self.lambda_kl, lambda_ac=self.lambda_ac, steps=self.reg_steps,
                          rolls=self.ac_rolls, generator=generator)

    # ------------------------------------------------------------------ decoding with the corrected noise
    @torch.no_grad()
    def decode(self, host: Host, inversion: Inversion, st: Settings, *, should_stop: StopFn | None
               ) -> torch.Tensor:
        if not self.correction:
            return super().decode(host, inversion, st, should_stop=should_stop)
        model = self.model(host)
        cond = model.encode_prompt(inversion.prompts)
        eps = corrected(self.decoder_eps(model, guidance=st.guidance, tau=st.tau), inversion, model.schedule,
                        torch.arange(len(inversion)))
        return ddim_loop(stoppable(eps, should_stop), inversion.noise, cond, self.decode_timesteps(model, inversion),
                         schedule=model.schedule).final

    def edit_eps(self, model: LatentDiffusion, inversion: Inversion, st: Settings, *, cond_src: Cond,
                 source_of: torch.Tensor, n_targets: int) -> EpsFn:
        eps = super().edit_eps(model, inversion, st, cond_src=cond_src, source_of=source_of, n_targets=n_targets)
        if not self.correction:
            return eps
        rows = torch.cat([torch.arange(len(cond_src)), torch.as_tensor(source_of).long().cpu()])
        return corrected(eps, inversion, model.schedule, rows)


class ReNoise4Call(ReNoise):
    iterations = 0
    first_iterations = 0
