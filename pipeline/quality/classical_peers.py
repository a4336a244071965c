"""Classical denoisers run beside the model on the very same noisy inputs: CBM3D.

CBM3D is BM3D for colour images (Dabov et al. 2007), from the `bm3d` package
(`pip install 'n2n[peers]'`), with its default profile, in the opponent colour space.
It is told the noise's standard deviation: the spec's own sigma when it fixes one
(`gaussian:25`, also `,8bit`: the published protocol), else the true standard deviation
of that image's noise, measured against the clean image (camera noise, grain, ranges of
sigma): an oracle no user has, so the peer is compared at its best. It runs on the CPU:
about 40-60 s per 481x321 image on 2 cores.

`cache=FOLDER` keeps each output as 8-bit codes under a key made of the noisy input's
bytes, the sigma and the peer's version, so evaluating a second model on the same inputs
does not run CBM3D again. Scores are taken on 8-bit output anyway, so the cache loses
nothing. Files are written under a temporary name and renamed, and read without pickle.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline.data.noise import GaussianNoise, Stored, parse_noise


def known_sigma(noise_spec: str) -> float | None:
    """The noise's sigma on the 0..1 scale when the spec fixes one (Gaussian, plain or stored), else None."""
    model = parse_noise(noise_spec)
    base = model.base if isinstance(model, Stored) and model.jpeg is None else model
    if isinstance(base, GaussianNoise) and base.sigma_min == base.sigma_max and not base.clip:
        return base.sigma_max / 255.0
    return None


def peer_sigma(noise_spec: str, noisy: torch.Tensor, clean: torch.Tensor) -> float:
    """The sigma (0..1 scale) a peer is told: the spec's, else the image's true noise RMS."""
    sigma = known_sigma(noise_spec)
    if sigma is not None:
        return sigma
    return float((noisy.to(torch.float64) - clean.to(torch.float64)).pow(2).mean().sqrt())


class CBM3D:
    """`CBM3D(cache=None)(noisy, sigma)`: noisy (C, H, W) in [0, 1], C = 1 or 3, sigma on the 0..1
    scale -> (C, H, W) float32."""

    name = "cbm3d"

    def __init__(self, cache: str | os.PathLike | None = None):
        try:
            import bm3d
        except ImportError:
            raise RuntimeError("--peer cbm3d needs the bm3d package: pip install 'n2n[peers]' (or: pip install bm3d)") from None
        self._bm3d = bm3d
        self.version = getattr(bm3d, "__version__", "") or _package_version("bm3d")
        self.cache = Path(cache) if cache else None
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)

    def __call__(self, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
        z = noisy.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()  # (H, W, C)
        key = self._key(z, sigma)
        cached = self._read(key)
        if cached is None:
            if z.shape[2] == 3:
                out = self._bm3d.bm3d_rgb(z, sigma)
            else:
                out = self._bm3d.bm3d(z[..., 0], sigma)[..., None]
            cached = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
            self._write(key, cached)
        return torch.from_numpy(cached.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def _key(self, z: np.ndarray, sigma: float) -> str:
        h = hashlib.sha256()
        h.update(f"cbm3d {self.version} np opp {z.shape} {sigma!r}".encode())
        h.update(np.ascontiguousarray(z, dtype=np.float32).tobytes())
        return h.hexdigest()

    def _read(self, key: str) -> np.ndarray | None:
        if self.cache is None:
            return None
        path = self.cache / f"{key}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def _write(self, key: str, codes: np.ndarray) -> None:
        if self.cache is None:
            return
        tmp = self.cache / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.save(f, codes, allow_pickle=False)
            os.replace(tmp, self.cache / f"{key}.npy")
        finally:
            tmp.unlink(missing_ok=True)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def make_peer(name: str, cache: str | None = None):
    """The peer called `name`: `peer(noisy, sigma) -> denoised`."""
    if name == "cbm3d":
        return CBM3D(cache=cache)
    raise ValueError(f"unknown peer {name!r} (known: cbm3d)")
