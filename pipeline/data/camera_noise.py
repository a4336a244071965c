"""Noise as cameras make it: a raw-sensor pipeline run on a clean sRGB crop, and grain.

`CameraNoise` follows the "unprocessing" of Brooks et al., *Unprocessing Images for
Learned Raw Denoising* (CVPR 2019): the clean sRGB image is taken back to what a sensor
recorded, noised there, and developed again as a camera would. The measurement is the
clean image plus the noise this development added, develop(raw + n) - develop(raw),
clipped to [0, 1]: the signal itself is not degraded by our simple demosaicing (about
30 dB on textured crops, which the network would otherwise learn to undo), while the
noise carries everything the pipeline does to it (signal dependence, correlation
across pixels and channels, the tone curve, clipping):

    sRGB --inverse tone curve--> linear RGB --inverse colour matrix--> camera RGB
         --inverse white balance and digital gain--> RGGB Bayer mosaic (linear raw)
         --shot + read noise: raw + N(0, shot * raw + read)-->
         --white balance and gain, clip--> bilinear demosaic --colour matrix, clip-->
         --tone curve--> sRGB in [0, 1]

Parameters are drawn per image as in the paper: the colour matrix is a random convex
combination of four cameras' XYZ-to-camera matrices (the paper's, from Adobe DNG
converter profiles) times sRGB-to-XYZ, rows normalised so white stays white; red gain
U(1.9, 2.4), blue gain U(1.5, 1.9), digital gain 1 / N(0.8, 0.1); shot noise log-uniform
in [1e-4, 1.2e-2] and read noise from the paper's fit, log(read) = 2.18 log(shot) + 1.2 +
N(0, 0.26) (read is a variance). Two deliberate differences from the paper: the tone
curve is gamma 1/2.2 *followed by* the smoothstep 3x^2 - 2x^3 in both directions, and the
gains are inverted exactly (no highlight-preserving "safe" inversion), so that without
noise the pipeline gives back the clean image up to the demosaicing loss; the paper's own
`process` skips the smoothstep and the digital gain, which leaves its images darker than
their sources. The demosaicing itself (bilinear, the simplest a camera may do) makes the
noise spatially correlated and mixes it between channels.

`GrainNoise` is spatially correlated Gaussian noise: white noise blurred by a Gaussian of
a random width ("grain size", 0.5 to 1.5 pixels by default) and scaled back to the wanted
standard deviation per pixel, for film grain and heavily processed phone noise.

Noise2Noise targets (`pair`). The input is the measurement above. The target is a second,
independent draw of the same camera (same parameters, new noise), whose mean must be the
clean image: developing the second noisy raw through the same non-linear pipeline would
bias it (E[f(x + n)] != f(x) for the concave tone curve: up to about 5 codes darker in the
darkest, noisiest crops; and the clipping at 0 would brighten black). So the target is
the clean crop plus the second raw noise carried through the pipeline's linear part
(gains, demosaic, colour matrix) and the tone curve's slope at the clean value: its mean
is the clean crop exactly, its correlation and signal dependence are the camera's. For
`GrainNoise` the target is the clean crop plus an independent grain draw.

Every random draw comes from the `torch.Generator` passed in, in a fixed order.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

# XYZ -> camera matrices of four cameras, and linear sRGB -> XYZ (D65), as in Brooks et al.
XYZ_TO_CAMERAS = torch.tensor([
    [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
    [[0.4913, -0.0541, -0.0202], [-0.6130, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
    [[0.8380, -0.2630, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
    [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.0970, 0.1581, 0.5181]],
], dtype=torch.float64)
RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
SHOT_RANGE = (1e-4, 1.2e-2)  # the paper's shot-noise range (variance per unit of signal)
_GAMMA = 2.2
_DARKEST = 1e-3  # the tone curve's slope is taken at max(linear value, this): finite at black


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _normal(g: torch.Generator) -> float:
    return float(torch.randn((), generator=g, dtype=torch.float64))


# ---------------------------------------------------------------------------- tone curve
def tone_curve(linear: torch.Tensor) -> torch.Tensor:
    """Linear RGB in [0, 1] -> sRGB-like display values: gamma 1/2.2, then smoothstep."""
    g = linear.clamp(min=1e-8) ** (1.0 / _GAMMA)
    return g * g * (3.0 - 2.0 * g)


def inverse_tone_curve(srgb: torch.Tensor) -> torch.Tensor:
    """Display values in [0, 1] -> linear RGB (inverse smoothstep, then gamma 2.2)."""
    y = srgb.clamp(0.0, 1.0)
    g = 0.5 - torch.sin(torch.asin(1.0 - 2.0 * y) / 3.0)
    return g.clamp(min=1e-8) ** _GAMMA


def tone_curve_slope(linear: torch.Tensor) -> torch.Tensor:
    """d tone_curve / d linear, at max(linear, 1e-3) (the slope is infinite at 0)."""
    lin = linear.clamp(_DARKEST, 1.0)
    g = lin ** (1.0 / _GAMMA)
    return 6.0 * g * (1.0 - g) * (1.0 / _GAMMA) * g / lin


# ---------------------------------------------------------------------------- Bayer
def mosaic(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) RGGB Bayer mosaic: R at (even, even), B at (odd, odd), G elsewhere."""
    out = rgb[1:2].clone()
    out[0, 0::2, 0::2] = rgb[0, 0::2, 0::2]
    out[0, 1::2, 1::2] = rgb[2, 1::2, 1::2]
    return out


def bayer_masks(height: int, width: int, dtype=torch.float64) -> torch.Tensor:
    """(3, H, W) 0/1 masks of the R, G and B sites of an RGGB mosaic."""
    masks = torch.zeros((3, height, width), dtype=dtype)
    masks[0, 0::2, 0::2] = 1
    masks[1, 0::2, 1::2] = 1
    masks[1, 1::2, 0::2] = 1
    masks[2, 1::2, 1::2] = 1
    return masks


def demosaic(raw: torch.Tensor) -> torch.Tensor:
    """(1, H, W) RGGB mosaic -> (3, H, W) by bilinear interpolation (a linear operation).

    Each channel's known sites are spread with the bilinear kernels; reflection at the
    border keeps the Bayer phase (index -1 mirrors 1).
    """
    _, h, w = raw.shape
    sparse = bayer_masks(h, w, raw.dtype) * raw  # (3, H, W), zeros off each channel's sites
    rb = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=raw.dtype) / 4
    gk = torch.tensor([[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]], dtype=raw.dtype) / 4
    kernels = torch.stack([rb, gk, rb]).unsqueeze(1)  # (3, 1, 3, 3)
    padded = F.pad(sparse.unsqueeze(0), (1, 1, 1, 1), mode="reflect") if min(h, w) > 1 else \
        F.pad(sparse.unsqueeze(0), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernels, groups=3)[0]


# ---------------------------------------------------------------------------- camera
@dataclasses.dataclass(frozen=True)
class CameraParams:
    """One simulated camera and exposure.

    Attributes:
        rgb_to_camera: (3, 3) float64, linear sRGB -> camera RGB; rows sum to 1.
        red_gain, blue_gain: white-balance gains; digital_gain: the overall gain.
        shot, read: noise variance is shot * raw + read (raw signal in [0, 1]).
    """

    rgb_to_camera: torch.Tensor
    red_gain: float
    blue_gain: float
    digital_gain: float
    shot: float
    read: float

    def gains(self, height: int, width: int) -> torch.Tensor:
        """(1, H, W) gain of every mosaic site (white balance times digital gain)."""
        masks = bayer_masks(height, width)
        per_site = masks[0] * self.red_gain + masks[1] + masks[2] * self.blue_gain
        return (per_site * self.digital_gain).unsqueeze(0)

    @property
    def camera_to_rgb(self) -> torch.Tensor:
        return torch.linalg.inv(self.rgb_to_camera)


def draw_camera(g: torch.Generator, shot_range: tuple[float, float] = SHOT_RANGE) -> CameraParams:
    """A random camera as in Brooks et al. (see the module docstring); draws in a fixed order."""
    weights = torch.rand(4, generator=g, dtype=torch.float64)
    xyz_to_camera = (weights.view(4, 1, 1) * XYZ_TO_CAMERAS).sum(0) / weights.sum()
    rgb_to_camera = xyz_to_camera @ RGB_TO_XYZ
    rgb_to_camera = rgb_to_camera / rgb_to_camera.sum(dim=1, keepdim=True)
    red_gain = _uniform(g, 1.9, 2.4)
    blue_gain = _uniform(g, 1.5, 1.9)
    digital_gain = 1.0 / min(max(0.8 + 0.1 * _normal(g), 0.5), 1.1)  # N(0.8, 0.1), kept in a sane range
    log_shot = _uniform(g, math.log(shot_range[0]), math.log(shot_range[1]))
    log_read = 2.18 * log_shot + 1.20 + 0.26 * _normal(g)
    return CameraParams(rgb_to_camera, red_gain, blue_gain, digital_gain, math.exp(log_shot), math.exp(log_read))


def _apply_matrix(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(3, 3) x (3, H, W) -> (3, H, W): a colour matrix applied to every pixel."""
    return torch.einsum("ij,jhw->ihw", matrix.to(image.dtype), image)


def unprocess(srgb: torch.Tensor, camera: CameraParams) -> torch.Tensor:
    """(3, H, W) sRGB in [0, 1] -> (1, H, W) linear raw mosaic (float64)."""
    linear = inverse_tone_curve(srgb.to(torch.float64))
    camera_rgb = _apply_matrix(camera.rgb_to_camera, linear)
    _, h, w = srgb.shape
    return mosaic(camera_rgb) / camera.gains(h, w)


def develop(raw: torch.Tensor, camera: CameraParams) -> torch.Tensor:
    """(1, H, W) raw mosaic -> (3, H, W) sRGB in [0, 1]: gains, clip, demosaic, matrix, clip, tone."""
    _, h, w = raw.shape
    balanced = (raw * camera.gains(h, w)).clamp(0.0, 1.0)
    rgb = _apply_matrix(camera.camera_to_rgb, demosaic(balanced)).clamp(0.0, 1.0)
    return tone_curve(rgb)


def _as_rgb(clean: torch.Tensor) -> torch.Tensor:
    if clean.shape[0] == 3:
        return clean
    if clean.shape[0] == 1:
        return clean.expand(3, -1, -1)
    raise ValueError(f"camera noise needs 1 or 3 channels, got {tuple(clean.shape)}")


@dataclasses.dataclass(frozen=True)
class CameraNoise:
    """Raw-sensor noise developed by a simulated camera (see the module docstring).

    Shape:
        clean: (C, H, W) or (N, C, H, W), C = 1 or 3, in [0, 1]; outputs have 3 channels,
        the dtype and device of `clean`. Measurements lie in [0, 1].
    """

    shot_min: float = SHOT_RANGE[0]
    shot_max: float = SHOT_RANGE[1]

    def __post_init__(self):
        if not (0 < self.shot_min <= self.shot_max and math.isfinite(self.shot_max)):
            raise ValueError(f"camera shot-noise range must satisfy 0 < min <= max < inf, "
                             f"got {self.shot_min:g}-{self.shot_max:g}")

    @property
    def spec(self) -> str:
        if (self.shot_min, self.shot_max) == SHOT_RANGE:
            return "camera"
        return f"camera:{self.shot_min:g}-{self.shot_max:g}"

    def clipped(self) -> "CameraNoise":
        return self  # developed images are in [0, 1] already

    def _noisy_shot(self, clean: torch.Tensor, g: torch.Generator, with_target: bool):
        """One image through a camera drawn from `g`: its noisy shot and, `with_target`, its
        Noise2Noise target (the clean image plus a second, independent draw of that camera's
        noise; see "Noise2Noise targets" above), else None. clean: (C, H, W); both (3, H, W)."""
        camera = draw_camera(g, (self.shot_min, self.shot_max))
        rgb = _as_rgb(clean).to("cpu", torch.float64)
        raw = unprocess(rgb, camera)
        std = (camera.shot * raw.clamp(min=0.0) + camera.read).sqrt()
        first = std * torch.randn(raw.shape, generator=g, dtype=torch.float64)
        noisy = (rgb + develop(raw + first, camera) - develop(raw, camera)).clamp(0.0, 1.0)
        if not with_target:
            return noisy.to(clean.device, clean.dtype), None
        _, h, w = raw.shape
        second = std * torch.randn(raw.shape, generator=g, dtype=torch.float64) * camera.gains(h, w)
        linear_noise = _apply_matrix(camera.camera_to_rgb, demosaic(second))
        slope = tone_curve_slope(inverse_tone_curve(rgb))
        tgt = rgb + slope * linear_noise
        return noisy.to(clean.device, clean.dtype), tgt.to(clean.device, clean.dtype)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if clean.ndim == 3:
            return self._noisy_shot(clean, generator, False)[0]
        return torch.stack([self._noisy_shot(c, generator, False)[0] for c in clean])

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if clean.ndim == 3:
            return self._noisy_shot(clean, generator, True)
        inputs, targets = zip(*(self._noisy_shot(c, generator, True) for c in clean))
        return torch.stack(inputs), torch.stack(targets)


# ---------------------------------------------------------------------------- grain
def gaussian_kernel(std: float) -> torch.Tensor:
    """(K,) normalised 1-D Gaussian, K = 2 ceil(3 std) + 1."""
    radius = max(1, math.ceil(3 * std))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / std) ** 2)
    return k / k.sum()


def grain(shape: tuple[int, ...], sigma: float, grain_std: float, g: torch.Generator) -> torch.Tensor:
    """(C, H, W) float64 noise of standard deviation `sigma` per pixel, blurred by a Gaussian of `grain_std` px.

    White noise blurred by a normalised kernel k has variance sum(k^2); dividing by its
    square root restores unit variance (exactly, away from the reflected border).
    """
    white = torch.randn(shape, generator=g, dtype=torch.float64)
    k = gaussian_kernel(grain_std)
    r = (k.numel() - 1) // 2
    c = shape[0]
    x = white.unsqueeze(0)  # (1, C, H, W)
    pad_mode = "reflect" if min(shape[1:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=pad_mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=pad_mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0] * (sigma / float((k ** 2).sum()))


@dataclasses.dataclass(frozen=True)
class GrainNoise:
    """Spatially correlated Gaussian noise; sigma (0..255 scale) and grain size drawn per image.

    Shape:
        clean: (C, H, W) or (N, C, H, W) float; outputs the same shape, dtype and device.
    """

    sigma_min: float
    sigma_max: float
    grain_min: float = 0.5
    grain_max: float = 1.5
    clip: bool = False

    def __post_init__(self):
        if not (0 <= self.sigma_min <= self.sigma_max and math.isfinite(self.sigma_max)):
            raise ValueError(f"grain sigma must satisfy 0 <= min <= max < inf, got {self.sigma_min:g}-{self.sigma_max:g}")
        if not (0 < self.grain_min <= self.grain_max <= 16):
            raise ValueError(f"grain size must satisfy 0 < min <= max <= 16 px, got {self.grain_min:g}-{self.grain_max:g}")

    @property
    def spec(self) -> str:
        def span(a, b):
            return f"{a:g}" if a == b else f"{a:g}-{b:g}"
        text = f"grain:{span(self.sigma_min, self.sigma_max)}"
        if (self.grain_min, self.grain_max) != (0.5, 1.5):
            text += f",size={span(self.grain_min, self.grain_max)}"
        return text + (",clip" if self.clip else "")

    def clipped(self) -> "GrainNoise":
        return dataclasses.replace(self, clip=True)

    def _draw(self, clean: torch.Tensor, g: torch.Generator, count: int) -> list[torch.Tensor]:
        sigma = _uniform(g, self.sigma_min, self.sigma_max) / 255.0
        size = _uniform(g, self.grain_min, self.grain_max)
        return [(clean.to("cpu", torch.float64) + grain(tuple(clean.shape), sigma, size, g)) for _ in range(count)]

    def _out(self, y: torch.Tensor, like: torch.Tensor, clip: bool) -> torch.Tensor:
        return (y.clamp(0.0, 1.0) if clip else y).to(like.device, like.dtype)

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if clean.ndim == 4:
            return torch.stack([self.apply(c, generator) for c in clean])
        return self._out(self._draw(clean, generator, 1)[0], clean, self.clip)

    def pair(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if clean.ndim == 4:
            inputs, targets = zip(*(self.pair(c, generator) for c in clean))
            return torch.stack(inputs), torch.stack(targets)
        a, b = self._draw(clean, generator, 2)
        return self._out(a, clean, self.clip), self._out(b, clean, False)
