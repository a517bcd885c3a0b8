"""SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations",
ICLR): no inversion; the source latent is noised to the strength's start time with the forward process
q(x_t | x_0) and denoised under the target prompt, without attention control (there is no source trajectory to
borrow attention from). Its one home: the timesteps, the noising, the record and the two methods,

- ``sdedit``: the teacher's DDIM steps on the original UNet (two-pass CFG);
- ``sdedit-icd``: the iCD reverse model's remaining jumps (guidance-distilled UNet, reverse adapter).

The record is an `Inversion` with timesteps [0, t_start], latents [z0, x_t_start] and the strength, step count and
seed in its settings (0 UNet calls to make).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from icd.editing.inversion import Inversion
from icd.methods.base import Host, Method, Settings
from icd.methods.icd import AdapterMethod
from icd.models.base import LatentDiffusion
from icd.samplers import StopFn, generation_timesteps, initial_noise
from icd.schedule import NoiseSchedule

DEFAULT_STRENGTH = 0.4  # SDEdit's start noise level S (t_S = S T), chosen on validation cases (experiments/sdedit.md)


def check_strength(strength: float) -> None:
    """ValueError unless `strength` lies in (0, 1] (SDEdit's start noise level as a fraction of T)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength (--strength) must lie in (0, 1], got {strength}")


def sdedit_timesteps(strength: float, schedule: Sequence[int], *, num_timesteps: int = 1000) -> list[int]:
    """SDEdit's denoising times (Algorithm 1 starts the reverse process at t0 = S T): the tail of a descending
    sampling `schedule` (ending at 0) that starts at its start point nearest to

        t_S = S T - 1        (S = `strength` in (0, 1], T = `num_timesteps`; ties: the lower start),

    so S = 1 runs the whole schedule (plain generation's) and a small S at least its last step. The DDIM-50 grid
    999 -> 979 -> ... -> 19 -> 0 at S = 0.5 starts at 499 (25 UNet calls, 50 S); the 4step-1 reverse schedule
    999 -> 779 -> 519 -> 259 -> 0 at S = 0.5 starts at 519 (2 jumps)."""
    check_strength(strength)
    steps = [int(t) for t in schedule]
    if len(steps) < 2 or steps[-1] != 0 or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"sdedit_timesteps needs a descending schedule ending at 0, got {steps}")
    target = strength * num_timesteps - 1
    k = min(range(len(steps) - 1), key=lambda i: (abs(steps[i] - target), steps[i]))
    return steps[k:]


def sdedit_noised(z0: torch.Tensor, noise: torch.Tensor, t: int, *, schedule: NoiseSchedule) -> torch.Tensor:
    """SDEdit's start (Algorithm 1, VP form): one draw of the forward process

        q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I):   x_t = alpha_t z0 + sigma_t eps,

    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), eps = `noise` (seeded N(0, I), `SeededNoise`)."""
    return schedule.add_noise(z0, noise.to(z0.dtype), int(t))


class SDEdit(Method):
    def schedule(self, model: LatentDiffusion):
        """The teacher's DDIM sampler: the model's scheduler-config end points, as the DDIM methods
        (`icd.methods.ddim.DDIM.schedule`), so strength 1 from pure noise is DDIM generation."""
        return model.schedule.configured()

    def resolve_strength(self, strength: float | None) -> float:
        strength = DEFAULT_STRENGTH if strength is None else strength
        check_strength(strength)
        return strength

    def full_schedule(self, model: LatentDiffusion, steps: int) -> list[int]:
        """The whole descending schedule SDEdit runs the tail of: the teacher's DDIM grid of `steps`."""
        return generation_timesteps(steps, model.schedule)

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        """The record (no UNet call): z0 noised with the seeded draw (the same seed for every row, as iCD's
        encoding noise) to the start time of the strength on `full_schedule`."""
        noise = initial_noise(z0.shape[1:], [st.seed] * z0.shape[0], z0.device)
        times = sdedit_timesteps(st.strength, self.full_schedule(model, st.steps),
                                 num_timesteps=model.schedule.num_timesteps)
        return Inversion(latents=[z0, sdedit_noised(z0, noise, times[0], schedule=model.schedule)],
                         timesteps=[0, times[0]], prompts=prompts, method=self.name,
                         settings={"seed": st.seed, "strength": st.strength, "steps": st.steps, "model": model.name})

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (seed,)  # the noise draw

    def inversion_steps(self, inversion: Inversion) -> int:
        return inversion.settings.get("steps")

    def decode_timesteps(self, model: LatentDiffusion, inversion: Inversion) -> list[int]:
        """The denoising times of a record on `model`; ValueError when its strength, step count or start time
        does not fit (a record from other adapters or another step count)."""
        strength, steps = inversion.settings.get("strength"), inversion.settings.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"this SDEdit record has no valid step count ({steps!r})")
        try:
            check_strength(strength)
        except ValueError:
            raise ValueError(f"this SDEdit record has no valid strength ({strength!r})") from None
        schedule = self.full_schedule(model, steps)
        times = sdedit_timesteps(strength, schedule, num_timesteps=model.schedule.num_timesteps)
        if list(inversion.timesteps) != [0, times[0]]:
            raise ValueError(f"this SDEdit record's times are {list(inversion.timesteps)}, but strength {strength:g} "
                             f"on {schedule} starts at {times[0]}: noise the image again with these settings")
        return times

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        self.decode_timesteps(model, inversion)
        super().check_inversion(model, inversion)


class SDEditICD(SDEdit, AdapterMethod):
    unet = "icd"
    own_steps = True

    def schedule(self, model: LatentDiffusion):
        """iCD's: time 0 is clean data (the adapters' last boundary)."""
        return model.schedule

    def full_schedule(self, model: LatentDiffusion, steps: int) -> list[int]:
        """The iCD reverse jumps T-1 -> E_R[-1] -> ... -> 0 of `model`'s adapters."""
        return model.icd.boundaries.reverse_schedule()
