"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"): AlexNet
features + the LPIPS linear layers, re-implemented in plain torch from a local weights file (never downloaded).
`icd.bench.optional_metrics` builds it with the other weight-based metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BATCH = 16  # images per forward pass

# LPIPS v0.1 (Zhang et al. 2018): AlexNet conv layers (torchvision `features.*` indices) and the linear layers on
# the five ReLU taps; shapes are checked when loading.
ALEXNET_CONVS = {  # index -> (out, in, kernel, stride, padding)
    0: (64, 3, 11, 4, 2),
    3: (192, 64, 5, 1, 2),
    6: (384, 192, 3, 1, 1),
    8: (256, 384, 3, 1, 1),
    10: (256, 256, 3, 1, 1),
}
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer, on inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_MIN_SIDE = 64  # smaller images are bilinearly upsampled so that AlexNet's fifth tap is still 3x3


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _check_images(*batches: np.ndarray) -> list[np.ndarray]:
    """Validate uint8-range ``[N, H, W, 3]`` batches of equal length."""
    out = [np.asarray(b) for b in batches]
    for b in out:
        if b.ndim != 4 or b.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {b.shape}")
    if len({len(b) for b in out}) > 1:
        raise ValueError(f"batches differ in length: {[len(b) for b in out]}")
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` state dict (``torch.load(weights_only=True)``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # only when LPIPS weights are given

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _lpips_expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (out, inp, k, _, _) in ALEXNET_CONVS.items():
        shapes[f"features.{i}.weight"] = (out, inp, k, k)
        shapes[f"features.{i}.bias"] = (out,)
    for i, c in enumerate(LPIPS_CHANNELS):
        shapes[f"lin{i}.model.1.weight"] = (1, c, 1, 1)
    return shapes


def _load_lpips_weights(spec: str) -> dict[str, torch.Tensor] | str:
    """The LPIPS tensors from one path or a comma-separated pair (AlexNet file, LPIPS lin file); or a reason."""
    state: dict[str, torch.Tensor] = {}
    for part in (p.strip() for p in spec.split(",")):
        path = Path(part).expanduser()
        if not path.is_file():
            return f"weights file not found: {path}"
        try:
            state.update(_read_weights(path))
        except Exception as error:  # any unreadable file becomes a Skipped reason, never a crash
            return f"cannot read {path}: {_one_line(error)}"
    expected = _lpips_expected_shapes()
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        return f"{spec} lacks keys {shown}; expected AlexNet features.* and LPIPS v0.1 lin0..lin4.model.1.weight"
    wrong = [f"{k} {tuple(state[k].shape)} != {s}" for k, s in expected.items() if tuple(state[k].shape) != s]
    if wrong:
        return f"{spec} has wrong shapes: {'; '.join(wrong[:3])}"
    return {k: state[k].float() for k in expected}


def _alexnet_taps(x: torch.Tensor, w: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """AlexNet conv features (Krizhevsky et al. 2012, torchvision layout) after each of its five ReLUs."""
    taps = []
    for i, (_, _, _, stride, padding) in ALEXNET_CONVS.items():
        if i in (3, 6):  # max-pool 3/2 after the first two conv blocks
            x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.relu(F.conv2d(x, w[f"features.{i}.weight"], w[f"features.{i}.bias"], stride=stride, padding=padding))
        taps.append(x)
    return taps


class LPIPS:
    """LPIPS v0.1 distance (Zhang et al. 2018) with the AlexNet backbone; 0 for identical images, lower is closer.

    Images go to [-1, 1], through the LPIPS scaling layer ((x - shift) / scale) and AlexNet; at each of the five
    ReLU taps the features are unit-normalised over channels, the squared difference is weighted by the 1x1 linear
    layer, averaged over space, and the five values are summed. Images whose shorter side is below 64 px are first
    upsampled bilinearly to a 64 px shorter side (at 32 px AlexNet's last taps would be 1x1, below 16 px the net
    cannot run); distances at such sizes are comparable only among themselves.
    """

    name = "lpips"

    def __init__(self, weights: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.weights = {k: v.to(self.device) for k, v in weights.items()}
        self.shift = torch.tensor(LPIPS_SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(LPIPS_SCALE, device=self.device).view(1, 3, 1, 1)

    def _features(self, images: np.ndarray) -> list[torch.Tensor]:
        x = torch.as_tensor(images, dtype=torch.float32, device=self.device).permute(0, 3, 1, 2) / 127.5 - 1.0
        h, w = x.shape[2:]
        if min(h, w) < LPIPS_MIN_SIDE:
            f = LPIPS_MIN_SIDE / min(h, w)
            x = F.interpolate(x, size=(max(LPIPS_MIN_SIDE, round(h * f)), max(LPIPS_MIN_SIDE, round(w * f))),
                              mode="bilinear", align_corners=False)
        taps = _alexnet_taps((x - self.shift) / self.scale, self.weights)
        return [t / (t.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for t in taps]

    @torch.inference_mode()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-image LPIPS distance between uint8 batches `a` and `b` ``[N, H, W, 3]``."""
        a, b = _check_images(a, b)
        out = []
        for i in range(0, len(a), BATCH):
            # a and b run as separate, equally shaped batches, so identical images give bit-identical features
            fa, fb = self._features(a[i : i + BATCH]), self._features(b[i : i + BATCH])
            d = sum(
                F.conv2d((ta - tb) ** 2, self.weights[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
                for k, (ta, tb) in enumerate(zip(fa, fb))
            )
            out.append(d.double().cpu())
        return torch.cat(out).numpy()
