"""Noise models that synthesize noisy observations of clean images, seeded by the caller.

Specs (`parse_noise`), on the 0..255 scale for sigma:
- `gaussian:25`     additive N(0, (25/255)^2) per pixel;
- `gaussian:0-50`   sigma drawn uniformly in [0, 50] once per image, then as above;
- `poisson:30`      photon shot noise, 30 photons at white: Poisson(30 x) / 30;
- `impulse:0.1`     random-valued impulses: each value replaced, with probability 0.1,
                    by a uniform random value in [0, 1] (per channel value).
Append `,clip` (e.g. `gaussian:25,clip`) or pass `clip=True` to clip to [0, 1].

Clipping policy:
- Training pairs are NOT clipped by default. Noise2Noise needs E[target | input] = clean;
  clipping Gaussian noise at 0 and 1 biases dark and bright pixels (the mean of a clipped
  Gaussian near 0 is above 0), which the network would learn. Unclipped Gaussian and
  Poisson noise are exactly mean-preserving.
- Evaluation inputs are *measurements*: what a camera or an 8-bit file would hold, so
  they are clipped to [0, 1] (`model.clipped()`; `n2n evaluate` uses it).
- Impulse values lie in [0, 1] already; impulse noise is not mean-preserving (use L1 /
  median-seeking losses with it, as in the paper).

Every random draw comes from the `torch.Generator` passed to `apply`, so a generator
seeded from (seed, step, position) always gives the same noise.
"""
from __future__ import annotations

import dataclasses

import torch


def _per_image(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(C, H, W) -> (1, C, H, W), or (N, C, H, W) unchanged; returns whether it was unbatched."""
    if x.ndim == 3:
        return x.unsqueeze(0), True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"expected (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Additive Gaussian noise; sigma (0..255 scale) fixed or drawn uniformly per image.

    Shape:
        clean: (C, H, W) or (N, C, H, W) float; output the same shape and dtype.
    """

    sigma_min: float
    sigma_max: float
    clip: bool = False

    def __post_init__(self):
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @property
    def spec(self) -> str:
        s = f"{self.sigma_min:g}" if self.sigma_min == self.sigma_max else f"{self.sigma_min:g}-{self.sigma_max:g}"
        return f"gaussian:{s}" + (",clip" if self.clip else "")

    def clipped(self) -> "GaussianNoise":
        return dataclasses.replace(self, clip=True)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x, single = _per_image(clean)
        n = x.shape[0]
        if self.sigma_min == self.sigma_max:
            sigma = torch.full((n, 1, 1, 1), self.sigma_max / 255.0, dtype=x.dtype)
        else:
            u = torch.rand((n, 1, 1, 1), generator=generator, dtype=x.dtype)
            sigma = (self.sigma_min + (self.sigma_max - self.sigma_min) * u) / 255.0
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        y = x + noise.to(x.device) * sigma.to(x.device)
        if self.clip:
            y = y.clamp(0.0, 1.0)
        return y[0] if single else y


@dataclasses.dataclass(frozen=True)
class PoissonNoise:
    """Shot noise: Poisson(photons x clean) / photons; `photons` is the count at white (1.0).

    Shape:
        clean: (C, H, W) or (N, C, H, W) float in [0, 1]; output the same shape and dtype.
    """

    photons: float
    clip: bool = False

    def __post_init__(self):
        if not self.photons > 0:
            raise ValueError(f"photons must be > 0, got {self.photons}")

    @property
    def spec(self) -> str:
        return f"poisson:{self.photons:g}" + (",clip" if self.clip else "")

    def clipped(self) -> "PoissonNoise":
        return dataclasses.replace(self, clip=True)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rate = (clean.to("cpu", torch.float64).clamp(min=0.0) * self.photons)
        y = (torch.poisson(rate, generator=generator) / self.photons).to(clean.dtype).to(clean.device)
        if self.clip:
            y = y.clamp(0.0, 1.0)
        return y


@dataclasses.dataclass(frozen=True)
class ImpulseNoise:
    """Random-valued impulse noise: each value replaced with probability `fraction` by U(0, 1).

    Shape:
        clean: (C, H, W) or (N, C, H, W) float; output the same shape and dtype.
    """

    fraction: float
    clip: bool = False

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")

    @property
    def spec(self) -> str:
        return f"impulse:{self.fraction:g}" + (",clip" if self.clip else "")

    def clipped(self) -> "ImpulseNoise":
        return dataclasses.replace(self, clip=True)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hit = torch.rand(clean.shape, generator=generator) < self.fraction
        values = torch.rand(clean.shape, generator=generator, dtype=clean.dtype)
        y = torch.where(hit.to(clean.device), values.to(clean.device), clean)
        if self.clip:
            y = y.clamp(0.0, 1.0)
        return y


NoiseModel = GaussianNoise | PoissonNoise | ImpulseNoise


def parse_noise(spec: str, *, clip: bool = False) -> NoiseModel:
    """"gaussian:25", "gaussian:0-50", "poisson:30", "impulse:0.1", optionally ",clip"."""
    text = spec.strip().lower()
    if text.endswith(",clip"):
        text, clip = text[: -len(",clip")], True
    kind, _, arg = text.partition(":")
    try:
        if kind == "gaussian":
            lo, _, hi = arg.partition("-")
            return GaussianNoise(float(lo), float(hi or lo), clip=clip)
        if kind == "poisson":
            return PoissonNoise(float(arg), clip=clip)
        if kind == "impulse":
            return ImpulseNoise(float(arg), clip=clip)
    except ValueError as e:
        raise ValueError(f"bad noise spec {spec!r}: {e}") from None
    raise ValueError(f"bad noise spec {spec!r}: expected gaussian:S, gaussian:A-B, poisson:P or impulse:F")
