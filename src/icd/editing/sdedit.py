"""SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations",
ICLR) as an editing method: no inversion, the source latent is noised to the strength's start time with the forward
process q(x_t | x_0) and denoised under the target prompt. The math is `icd.samplers.sdedit_timesteps` /
`sdedit_noised` / `sdedit_encode`; `icd.pipeline` dispatches ``sdedit`` (the teacher: DDIM on the original UNet)
and ``sdedit-icd`` (the iCD reverse model's jumps).

This module holds SDEdit's record (an `Inversion` with timesteps [0, t_start] and the strength, step count and seed
in its settings) and the controls it takes: none, since SDEdit has no source trajectory to borrow attention from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from icd.editing.edit import EditControls
from icd.editing.inversion import Inversion
from icd.models.base import LatentDiffusion
from icd.samplers import check_strength, generation_timesteps, initial_noise, sdedit_encode, sdedit_timesteps

METHODS = ("sdedit", "sdedit-icd")  # the pipeline's SDEdit methods (icd.pipeline.METHODS)
NO_CONTROL = EditControls(p2p=None, masactrl=None)  # SDEdit's controls: a plain decode under the target prompt


def sdedit_controls(controls: EditControls | None) -> EditControls:
    """The controls of an SDEdit decode: `NO_CONTROL` for None; ValueError for Prompt-to-Prompt or MasaCtrl."""
    if controls is None:
        return NO_CONTROL
    if controls.p2p is not None or controls.masactrl is not None:
        raise ValueError(f"SDEdit takes no attention control ({controls.control} given): pass "
                         "EditControls(p2p=None) (no Prompt-to-Prompt, local blend, mask or MasaCtrl)")
    return controls


def resolve_strength(method: str, strength: float | None, *, default: float) -> float | None:
    """The strength of a run of `method`: `default` when None for an SDEdit method (checked in (0, 1]); None for
    any other method, which refuses one."""
    if method not in METHODS:
        if strength is not None:
            raise ValueError(f"strength (--strength) applies to SDEdit ({', '.join(METHODS)}), not {method}")
        return None
    strength = default if strength is None else strength
    check_strength(strength)
    return strength


def full_schedule(model: LatentDiffusion, method: str, steps: int) -> list[int]:
    """The whole descending schedule SDEdit runs the tail of: for ``sdedit-icd`` the iCD reverse jumps
    T-1 -> E_R[-1] -> ... -> 0 of `model`'s adapters, for ``sdedit`` the teacher's DDIM grid of `steps`."""
    return model.icd.boundaries.reverse_schedule() if method == METHODS[1] else generation_timesteps(steps)


def encode(model: LatentDiffusion, z0: torch.Tensor, prompts: Sequence[str], *, method: str, steps: int,
           strength: float, seed: int) -> Inversion:
    """SDEdit's record of clean latents `z0` (no UNet call): z0 noised with the `seed`ed draw (the same seed for
    every row, as iCD's encoding noise) to the start time of `strength` on `full_schedule`."""
    noise = initial_noise(z0.shape[1:], [seed] * z0.shape[0], z0.device)
    times = sdedit_timesteps(strength, full_schedule(model, method, steps),
                             num_timesteps=model.schedule.num_timesteps)
    timesteps, latents = sdedit_encode(z0, times, schedule=model.schedule, noise=noise)
    return Inversion(latents=latents, timesteps=timesteps, prompts=list(prompts), method=method,
                     settings={"seed": seed, "strength": strength, "steps": steps, "model": model.name})


def steps_of(inversion: Inversion) -> int:
    """The step count an inversion was made with: SDEdit's record keeps it in its settings, the others visit one
    latent per time."""
    return inversion.settings.get("steps") if inversion.method in METHODS else len(inversion.timesteps) - 1


def decode_timesteps(model: LatentDiffusion, inversion: Inversion) -> list[int]:
    """The denoising times of an SDEdit record on `model`; ValueError when its strength, step count or start time
    does not fit (a record from other adapters or another step count)."""
    strength, steps = inversion.settings.get("strength"), inversion.settings.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"this SDEdit record has no valid step count ({steps!r})")
    try:
        check_strength(strength)
    except ValueError:
        raise ValueError(f"this SDEdit record has no valid strength ({strength!r})") from None
    schedule = full_schedule(model, inversion.method, steps)
    times = sdedit_timesteps(strength, schedule, num_timesteps=model.schedule.num_timesteps)
    if list(inversion.timesteps) != [0, times[0]]:
        raise ValueError(f"this SDEdit record's times are {list(inversion.timesteps)}, but strength {strength:g} on "
                         f"{schedule} starts at {times[0]}: noise the image again with these settings")
    return times
