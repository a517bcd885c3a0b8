"""The iCD run's config (`icd train icd`, a TOML table): the recipe of paper eq. 5 and what this project adds (one
adapter at a time, the network itself as R, sharding); every field's meaning beside it, each range checked when the
config is made (a one-line `ConfigError`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from icd.boundaries import Boundaries
from icd.models import lora
from icd.train.config import ConfigError, DataConfig, RunConfig, ScaleConfig

UPDATES = ("joint", "sequential")
TRAIN = ("both", "reverse", "forward")  # which adapters a run trains (`icd.train.icd`'s docstring)
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ICDConfig(ScaleConfig, DataConfig, RunConfig):
    out_dir: str = "runs/icd"
    model: str = "embedded"  # pipeline folder holding the guidance-distilled UNet
    unet_subfolder: str = "unet_guidance"
    boundaries: str = "4step-1"  # preset (icd.boundaries.PRESETS) unless reverse/forward lists are given
    reverse_boundaries: tuple[int, ...] = ()  # explicit E_R, e.g. [0, 259, 519, 779]
    forward_boundaries: tuple[int, ...] = ()  # explicit E_F, e.g. [259, 519, 779, 999]
    w_set: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)  # guidance codes for reverse CD, sampled uniformly
    tau: float = 0.8  # dynamic-CFG threshold recommended with these boundaries (inference only; docs/method.md §7)
    lambda_f: float = 1.5  # weight of L_f (trains F)
    lambda_r: float = 1.5  # weight of L_r (trains R)
    forward_cd: bool = True  # False: F learns from L_f alone (paper Table 2 row E, "encoder regime")
    reverse_own_latents: float = 0.0  # fraction of reverse-CD rows that start from R's own latents at an interior
    # boundary (decoded from noise by R itself, no gradient) instead of noised data; 0 = the paper's L_CD^R
    reverse_own_w: tuple[float, ...] = ()  # only rows drawn with these guidance codes may start from R's own
    # latents, e.g. [1, 2, 3] keeps the unguided R (which F inverts) on the paper's loss; () = every code
    huber_c: float = 1e-3
    rank: int = 64
    alpha: int = 8
    lr: float = 8e-6  # AdamW; the paper keeps it constant
    lr_schedule: str = "constant"  # "constant" (paper) | "cosine": cosine decay from lr to lr_min over `steps`
    steps: int = 6000
    update: str = "joint"  # "joint" (eq. 5 exactly) or "sequential" (reference compatibility)
    max_objects: int = 2
    ema_decay: float = 0.0  # > 0: keep an EMA of both adapters (`icd.train.scaffold.EMA`) and save it as final
    init_adapters: str = ""  # adapters folder (adapters.json + both files) to start from, e.g. to fine-tune at lower lr
    train: str = "both"  # "both" (eq. 5), "reverse" (R by L_CD^R only) or "forward" (F only, R frozen: init_adapters)
    reverse: str = "adapter"  # R: the reverse adapter, or "model": the network itself (train = "forward" only; schnell)
    fsdp: bool = False  # shard the frozen network across processes (FSDP2; `icd.runtime.shard_frozen`); LoRA whole

    def __post_init__(self):
        super().__post_init__()
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"ICDConfig.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.train not in TRAIN:
            raise ConfigError(f"ICDConfig.train must be one of {', '.join(TRAIN)}, got {self.train!r}")
        if self.reverse not in lora.REVERSES:
            raise ConfigError(f"ICDConfig.reverse must be one of {', '.join(lora.REVERSES)}, got {self.reverse!r}")
        if self.reverse == "model" and (self.train != "forward" or list(self.w_set) != [0.0]):
            raise ConfigError("ICDConfig: reverse = 'model' (the network itself decodes, unguided) trains F alone: "
                              "set train = 'forward' and w_set = [0.0]")
        if self.train == "forward" and self.reverse == "adapter" and not self.init_adapters:
            raise ConfigError("ICDConfig: train = 'forward' trains F against a frozen R: set init_adapters to the "
                              "folder of the reverse run (or reverse = 'model' when the network itself is R)")
        if self.update not in UPDATES:
            raise ConfigError(f"ICDConfig.update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if self.update == "sequential" and self.gradient_accumulation > 1:
            raise ConfigError("ICDConfig: update = 'sequential' steps once per loss term; it takes no "
                              "gradient_accumulation (use update = 'joint')")
        if not self.w_set or any(w < 0 for w in self.w_set):
            raise ConfigError(f"ICDConfig.w_set must be non-empty codes >= 0, got {self.w_set}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"ICDConfig.tau must lie in [0, 1], got {self.tau}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ICDConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lambda_f < 0 or self.lambda_r < 0:
            raise ConfigError("ICDConfig.lambda_f and lambda_r must be >= 0")
        if not 0.0 <= self.reverse_own_latents <= 1.0:
            raise ConfigError(f"ICDConfig.reverse_own_latents must lie in [0, 1], got {self.reverse_own_latents}")
        if not self.forward_cd and self.lambda_f == 0:
            raise ConfigError("ICDConfig: forward_cd = false needs lambda_f > 0, or F would not train at all")
        if self.rank < 1 or self.alpha < 1 or not (math.isfinite(self.huber_c) and self.huber_c > 0):
            raise ConfigError(f"ICDConfig.rank, alpha and huber_c must be positive, got {self.rank}, {self.alpha}, "
                              f"{self.huber_c}")
        if not all(math.isfinite(w) for w in self.w_set):
            raise ConfigError(f"ICDConfig.w_set must hold finite codes, got {self.w_set}")
        try:
            boundaries = self.resolved_boundaries()  # validates
        except ValueError as e:
            raise ConfigError(f"ICDConfig: {e}") from None
        if self.fsdp and self.reverse_own_latents:
            raise ConfigError("ICDConfig: fsdp = true needs the same network calls on every process; "
                              "reverse_own_latents draws a different number per process (set it to 0)")
        if self.reverse_own_latents and boundaries.num_segments < 2:
            raise ConfigError("ICDConfig.reverse_own_latents needs at least two segments (an interior boundary)")
        if not set(self.reverse_own_w) <= set(self.w_set):
            raise ConfigError(f"ICDConfig.reverse_own_w must be a subset of w_set {list(self.w_set)}, "
                              f"got {list(self.reverse_own_w)}")

    def resolved_boundaries(self) -> Boundaries:
        if self.reverse_boundaries or self.forward_boundaries:
            return Boundaries(self.reverse_boundaries, self.forward_boundaries)
        return Boundaries.preset(self.boundaries)
