"""Noise models that synthesize noisy observations of clean images, seeded by the caller.

Specs (`parse_noise`), on the 0..255 scale for sigma:
- `gaussian:25`     additive N(0, (25/255)^2) per pixel;
- `gaussian:0-50`   sigma drawn uniformly in [0, 50] once per image, then as above;
- `poisson:30`      photon shot noise, 30 photons at white: Poisson(30 x) / 30;
- `impulse:0.1`     random-valued impulses: each value replaced, with probability 0.1,
                    by a uniform random value in [0, 1] (per channel value);
- `camera`          raw-sensor shot and read noise developed by a simulated camera
                    (Bayer mosaic, demosaicing, colour matrix, tone curve), after Brooks
                    et al. 2019; `camera:1e-4-1.2e-2` sets the shot-noise range
                    (`pipeline.data.camera_noise`);
- `grain:0-25`      spatially correlated Gaussian noise, sigma drawn per image, blurred by a
                    Gaussian of 0.5..1.5 px (`,size=1-3` changes the grain size);
- `photo`           the mixture the default model is trained on (`PRESETS`);
- `none`            nothing added: the data is noisy already (`--target neighbor` only).
Options after a comma, in any order:
- `,clip`           clip the measurement to [0, 1];
- `,8bit`           what an 8-bit file stores: clipped to [0, 1] and rounded to k / 255;
- `,jpeg=60-95`     then JPEG-compressed at a quality drawn per image (implies `,8bit`).
A mixture joins specs with `|`, each with an optional `@weight` (default 1):
`"gaussian:0-50,8bit@3 | camera,8bit@1"` draws one component per image.

Measurements and Noise2Noise pairs. `apply(clean, g)` is a noisy measurement: what a
model is given. `pair(clean, g)` is a training pair (input, target): the input is a
measurement, the target an *independent* draw whose mean is the clean image, so the
Noise2Noise minimizer (E[target | input]) is the clean image. Clipping, rounding and JPEG
are steps of the measurement only:
- Clipping biases: the mean of a clipped Gaussian at black is sigma / sqrt(2 pi) above 0
  (10 codes at sigma 25) and as much below 1 at white. A network trained on clipped
  targets learns that bias, greying black and white. So targets are never clipped, and
  never JPEG-compressed (JPEG smooths: its mean is not the clean image either). An
  `,8bit` target is rounded to k / 255 without clipping (rounding a value that carries
  noise of a code or more is unbiased to well under 0.01 codes).
- What the input keeps: clipping near black and white. The network learns there
  E[clean | clipped input], which is what an 8-bit photo allows.
- Real noisy pairs (two 8-bit shots of one scene, the pairs schema) are clipped on both
  sides: training on them, black and white come out about that bias too bright/dark
  at strong noise. That is the price of real data; synthetic pairs avoid it.
- Without options, `pair` is two measurements (`apply` twice, the input first): for
  Gaussian and Poisson noise unclipped draws are exactly mean-preserving. Impulse noise
  is not mean-preserving (train it with the L1 loss, as in the paper).

Evaluation inputs are measurements (`model.clipped()` for clipped float input; `n2n
evaluate` reports float and 8-bit inputs side by side).

Every random draw comes from the `torch.Generator` passed to `apply` / `pair`, so a
generator seeded from (seed, step, position) always gives the same noise.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re

import numpy as np
import torch

from n2n_core import quantize_8bit
from pipeline.data.camera_noise import CameraNoise, GrainNoise


def _per_image(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(C, H, W) -> (1, C, H, W), or (N, C, H, W) unchanged; returns whether it was unbatched."""
    if x.ndim == 3:
        return x.unsqueeze(0), True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"expected (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")


def _two_measurements(model, clean: torch.Tensor, generator: torch.Generator):
    """(input, target): a measurement, then an unclipped draw (see the module docstring)."""
    inp = model.apply(clean, generator)
    target_model = dataclasses.replace(model, clip=False) if getattr(model, "clip", False) else model
    return inp, target_model.apply(clean, generator)


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
        if not (0 <= self.sigma_min <= self.sigma_max and math.isfinite(self.sigma_max)):
            raise ValueError(f"sigma must satisfy 0 <= min <= max < inf, got {self.sigma_min:g}, {self.sigma_max:g}")

    @property
    def spec(self) -> str:
        s = f"{self.sigma_min:g}" if self.sigma_min == self.sigma_max else f"{self.sigma_min:g}-{self.sigma_max:g}"
        return f"gaussian:{s}" + (",clip" if self.clip else "")

    def clipped(self) -> "GaussianNoise":
        return dataclasses.replace(self, clip=True)

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return _two_measurements(self, clean, generator)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x, single = _per_image(clean)
        n = x.shape[0]
        if self.sigma_min == self.sigma_max:
            sigma = torch.full((n, 1, 1, 1), self.sigma_max / 255.0, dtype=x.dtype)
        else:
            u = torch.rand((n, 1, 1, 1), generator=generator, dtype=x.dtype)
            sigma = (self.sigma_min + (self.sigma_max - self.sigma_min) * u) / 255.0
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        y = noise.to(x.device).mul_(sigma.to(x.device)).add_(x)  # x + noise * sigma, in place (same values)
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
        if not (self.photons > 0 and math.isfinite(self.photons)):
            raise ValueError(f"photons must be a finite number > 0, got {self.photons:g}")

    @property
    def spec(self) -> str:
        return f"poisson:{self.photons:g}" + (",clip" if self.clip else "")

    def clipped(self) -> "PoissonNoise":
        return dataclasses.replace(self, clip=True)

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return _two_measurements(self, clean, generator)

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
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction:g}")

    @property
    def spec(self) -> str:
        return f"impulse:{self.fraction:g}" + (",clip" if self.clip else "")

    def clipped(self) -> "ImpulseNoise":
        return dataclasses.replace(self, clip=True)

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return _two_measurements(self, clean, generator)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hit = torch.rand(clean.shape, generator=generator) < self.fraction
        values = torch.rand(clean.shape, generator=generator, dtype=clean.dtype)
        y = torch.where(hit.to(clean.device), values.to(clean.device), clean)
        if self.clip:
            y = y.clamp(0.0, 1.0)
        return y



# ---------------------------------------------------------------------------- storage
def round_8bit_unclipped(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest k / 255 without clipping (an unbiased 8-bit-precision target)."""
    return torch.round(x * 255.0) / 255.0


def jpeg_roundtrip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(C, H, W) in [0, 1] (8-bit levels), C = 1 or 3 -> the same after JPEG at `quality` (Pillow's
    default 4:2:0 chroma subsampling, as cameras and the web store it)."""
    from PIL import Image

    codes = torch.round(image.detach().to("cpu", torch.float64).clamp(0, 1) * 255).to(torch.uint8)
    array = codes[0].numpy() if codes.shape[0] == 1 else codes.permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    out = torch.from_numpy(decoded.copy()).to(torch.float64) / 255.0
    out = out.unsqueeze(0) if out.ndim == 2 else out.permute(2, 0, 1)
    return out.to(image.device, image.dtype)


@dataclasses.dataclass(frozen=True)
class Stored:
    """A noise model whose measurements are stored as an 8-bit file, optionally JPEG-compressed.

    The measurement is clipped to [0, 1] and rounded to k / 255 (`quantize_8bit`), then,
    with `jpeg`, compressed at a quality drawn uniformly from the range per image. The
    Noise2Noise target is the base model's unbiased draw rounded to k / 255, never
    clipped or compressed (see the module docstring).

    Shape:
        clean: (C, H, W) or (N, C, H, W); outputs as the base model's.
    """

    base: object  # an unclipped noise model (Gaussian, Poisson, Impulse, Camera, Grain)
    jpeg: tuple[int, int] | None = None  # (lowest, highest) JPEG quality, or None

    def __post_init__(self):
        if getattr(self.base, "clip", False):
            raise ValueError("8bit already clips: drop ',clip'")
        if self.jpeg is not None and not (1 <= self.jpeg[0] <= self.jpeg[1] <= 100):
            raise ValueError(f"jpeg quality must satisfy 1 <= low <= high <= 100, got {self.jpeg[0]}-{self.jpeg[1]}")

    @property
    def spec(self) -> str:
        if self.jpeg is None:
            return f"{self.base.spec},8bit"
        low, high = self.jpeg
        return f"{self.base.spec},jpeg={low}" + (f"-{high}" if high != low else "")

    def clipped(self) -> "Stored":
        return self

    def _store(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        y = quantize_8bit(y)
        if self.jpeg is None:
            return y
        low, high = self.jpeg
        if y.ndim == 4:
            return torch.stack([self._store(one, generator) for one in y])
        quality = int(torch.randint(low, high + 1, (1,), generator=generator))
        return jpeg_roundtrip(y, quality)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._store(self.base.apply(clean, generator), generator)

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inp, tgt = self.base.pair(clean, generator)
        return self._store(inp, generator), round_8bit_unclipped(tgt)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """One component drawn per image, with probability proportional to its weight.

    Shape:
        clean: (C, H, W) or (N, C, H, W); outputs have 3 channels if any component makes
        colour noise of a grey image (camera noise), else the input's channels.
    """

    components: tuple  # ((noise model, weight), ...)

    def __post_init__(self):
        if not self.components:
            raise ValueError("a mixture needs at least one component")
        for model, weight in self.components:
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"mixture weight of {model.spec!r} must be a finite number > 0, got {weight:g}")

    @property
    def spec(self) -> str:
        return " | ".join(f"{m.spec}@{w:g}" for m, w in self.components)

    def clipped(self) -> "Mixture":
        return Mixture(tuple((m.clipped(), w) for m, w in self.components))

    def _choose(self, generator: torch.Generator):
        weights = [w for _, w in self.components]
        u = float(torch.rand((), generator=generator, dtype=torch.float64)) * sum(weights)
        for model, weight in self.components:
            if u < weight:
                return model
            u -= weight
        return self.components[-1][0]

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if clean.ndim == 4:
            return torch.stack([self.apply(c, generator) for c in clean])
        return self._choose(generator).apply(clean, generator)

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if clean.ndim == 4:
            inputs, targets = zip(*(self.pair(c, generator) for c in clean))
            return torch.stack(inputs), torch.stack(targets)
        return self._choose(generator).pair(clean, generator)


@dataclasses.dataclass(frozen=True)
class NoNoise:
    """`none`: the data is noisy already; nothing is added. Only a method that trains on single
    noisy images takes it (`--target neighbor`): a Noise2Noise pair needs two independent draws.

    Shape:
        clean: (C, H, W) or (N, C, H, W); `apply` returns it as it is.
    """

    @property
    def spec(self) -> str:
        return "none"

    def clipped(self) -> "NoNoise":
        return self

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return clean

    def pair(self, clean: torch.Tensor, generator: torch.Generator):
        raise ValueError("noise 'none' adds nothing: a Noise2Noise pair needs noise (use --target neighbor "
                         "to train on noisy images alone)")


NoiseModel = GaussianNoise | PoissonNoise | ImpulseNoise | CameraNoise | GrainNoise | Stored | Mixture | NoNoise

# Named mixtures. `photo` is the training noise of the default model's last run: white
# Gaussian noise as published benchmarks use it (float) and as 8-bit files hold it, camera
# noise, grain, and JPEG after noise as phones and the web store photos. (Its first run used
# the same components weighted 2, 3, 0.5, 2, 1, 1, 0.5; the second moved weight to the
# Gaussian components, whose figures were short of their targets: docs/default-model.md.)
PRESETS = {
    "photo": ("gaussian:0-50@3 | gaussian:0-50,8bit@4 | gaussian:0-50,jpeg=70-95@0.5 | camera,8bit@1.5"
              " | camera,jpeg=60-95@0.75 | grain:0-25,8bit@0.5 | grain:0-25,jpeg=60-95@0.25"),
}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER})(?:-({_NUMBER}))?$")


def _range(text: str, what: str) -> tuple[float, float]:
    """"25" -> (25, 25); "0-50" -> (0, 50); numbers are non-negative and finite."""
    match = _RANGE.match(text.strip())
    if not match:
        raise ValueError(f"{what} must be a finite non-negative number or a range LOW-HIGH, got {text!r}")
    low = float(match.group(1))
    high = float(match.group(2)) if match.group(2) is not None else low
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what} must be finite, got {text!r}")
    if low > high:
        raise ValueError(f"{what}: range {text!r} has LOW > HIGH")
    return low, high


def _single(text: str, what: str) -> float:
    low, high = _range(text, what)
    if low != high:
        raise ValueError(f"{what} must be one number, got the range {text!r}")
    return low


def _parse_one(spec: str, clip: bool):
    kind, _, rest = spec.partition(":")
    arg, *options = [part.strip() for part in rest.split(",")] if rest else [""]
    if not rest and "," in kind:  # "camera,8bit"
        kind, *options = [part.strip() for part in kind.split(",")]
    kind = kind.strip()
    opts = {}
    for option in options:
        name, eq, value = option.partition("=")
        if name in opts:
            raise ValueError(f"option {name!r} given twice")
        if name in ("clip", "8bit") and not eq:
            opts[name] = True
        elif name in ("jpeg", "size") and eq:
            opts[name] = value
        else:
            raise ValueError(f"unknown option {option!r} (options: clip, 8bit, jpeg=LOW-HIGH; grain: size=LOW-HIGH)")
    clip = clip or opts.pop("clip", False)
    if kind == "gaussian":
        base = GaussianNoise(*_range(arg, "gaussian sigma"))
    elif kind == "poisson":
        base = PoissonNoise(_single(arg, "poisson photons"))
    elif kind == "impulse":
        base = ImpulseNoise(_single(arg, "impulse fraction"))
    elif kind == "camera":
        base = CameraNoise(*_range(arg, "camera shot noise")) if arg else CameraNoise()
    elif kind == "grain":
        size = _range(opts.pop("size"), "grain size") if "size" in opts else (0.5, 1.5)
        base = GrainNoise(*_range(arg, "grain sigma"), *size)
    else:
        raise ValueError(f"unknown noise {kind!r}: expected gaussian:S, gaussian:A-B, poisson:P, impulse:F, "
                         f"camera, grain:A-B, a preset ({', '.join(PRESETS)}) or a mixture A@w | B@w")
    if "size" in opts:
        raise ValueError("size= applies to grain noise only")
    if "jpeg" in opts:
        low, high = _range(opts["jpeg"], "jpeg quality")
        if low != int(low) or high != int(high):
            raise ValueError(f"jpeg quality must be whole numbers, got {opts['jpeg']!r}")
        return Stored(base, (int(low), int(high)))
    if opts.get("8bit"):
        return Stored(base)
    if clip:
        if isinstance(base, CameraNoise):
            return base
        return dataclasses.replace(base, clip=True)
    return base


def parse_noise(spec: str, *, clip: bool = False) -> NoiseModel:
    """A noise model from its spec (see the module docstring); errors name the spec and the problem.

    `clip=True` clips the measurements (as the `,clip` option).
    """
    text = " ".join(str(spec).split()).lower()
    text = PRESETS.get(text, text)
    if text == "none":
        return NoNoise()
    try:
        parts = [p.strip() for p in text.split("|")]
        if len(parts) == 1 and "@" not in parts[0]:
            return _parse_one(parts[0], clip)
        components = []
        for part in parts:
            body, at, weight = part.rpartition("@")
            body, weight = (body, _single(weight, "mixture weight")) if at else (part, 1.0)
            components.append((_parse_one(body.strip(), clip), weight))
        return Mixture(tuple(components))
    except ValueError as e:
        raise ValueError(f"bad noise spec {spec!r}: {e}") from None
