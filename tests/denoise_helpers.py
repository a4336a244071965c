"""Test-only helpers for the denoising tests: a tiny fully convolutional Module
(torch.nn.functional inside; tests may use torch), the `checkpoint` fixture and image-tree
generators."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from n2n_core import Module, Parameter, build_model, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A module's model file: a tiny seeded `unet` (depth 2, width 8) saved as an n2n checkpoint."""
    model = build_model("unet", depth=2, width=8, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("model") / "tiny.n2n"
    save_checkpoint(path, model)
    return path


class TinyUNet(Module):
    """Two pooling levels with skips; size_multiple 4. Forward only (inference tests).

    Shape: (N, 3, H, W) with H, W multiples of 4 -> (N, 3, H, W).
    """

    size_multiple = 4
    in_channels = 3

    def __init__(self, width: int = 8, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def conv(cin, cout):
            w = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype) * (2.0 / (cin * 9)) ** 0.5
            return Parameter(w), Parameter(torch.randn(cout, generator=g, dtype=dtype) * 0.05)

        self.w0, self.b0 = conv(3, width)
        self.w1, self.b1 = conv(width, width)
        self.w2, self.b2 = conv(width, width)
        self.w3, self.b3 = conv(2 * width, width)
        self.w4, self.b4 = conv(width + 3, 3)
        self.calls = 0
        self.max_input = 0

    def forward(self, x):
        self.calls += 1
        self.max_input = max(self.max_input, x.shape[-1] * x.shape[-2])
        act = lambda t: F.leaky_relu(t, 0.1)
        e0 = act(F.conv2d(x, self.w0.data, self.b0.data, padding=1))
        e1 = act(F.conv2d(F.max_pool2d(e0, 2), self.w1.data, self.b1.data, padding=1))
        e2 = act(F.conv2d(F.max_pool2d(e1, 2), self.w2.data, self.b2.data, padding=1))
        d1 = torch.cat([F.interpolate(e2, scale_factor=2, mode="nearest"), e1], dim=1)
        d1 = act(F.conv2d(d1, self.w3.data, self.b3.data, padding=1))
        d0 = torch.cat([F.interpolate(d1, scale_factor=2, mode="nearest"), x], dim=1)
        return F.conv2d(d0, self.w4.data, self.b4.data, padding=1) * 0.2 + x


# -- image trees ---------------------------------------------------------------
import io
import struct
import zlib

import numpy as np
from PIL import Image

KINDS = [  # (format, extension, PIL mode)
    ("PNG", ".png", "RGB"), ("PNG", ".png", "L"), ("PNG", ".png", "RGBA"), ("PNG", ".png", "I;16"),
    ("JPEG", ".jpg", "RGB"), ("JPEG", ".jpg", "L"),
    ("TIFF", ".tif", "RGB"), ("TIFF", ".tif", "L"), ("TIFF", ".tif", "RGBA"), ("TIFF", ".tif", "I;16"),
]


def natural_array(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Smooth random shapes plus noise, float in [0, 1], (H, W, channels)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * yy * rng.uniform(0.5, 2))
                     for _ in range(channels)], axis=-1)
    return np.clip(0.5 + 0.35 * base + rng.normal(0, 0.08, (height, width, channels)), 0, 1)


def make_image(rng: np.random.Generator, fmt: str, mode: str, height: int, width: int) -> bytes:
    """Encoded bytes of a random natural-looking image in the given format and mode."""
    if mode == "I;16":
        array = (natural_array(rng, height, width, 1)[..., 0] * 65535).round().astype(np.uint16)
        image = Image.fromarray(array)  # uint16 (H, W) -> I;16
    else:
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        array = (natural_array(rng, height, width, channels) * 255).round().astype(np.uint8)
        image = Image.fromarray(array[..., 0] if channels == 1 else array)  # L, RGB or RGBA
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def pixel_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (10 gigapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def make_tree(root, count: int, *, seed: int = 0, min_side: int = 8, max_side: int = 72) -> list[str]:
    """Write `count` good images of mixed sizes, formats and modes under root, in nested
    folders; returns their relative paths."""
    rng = np.random.default_rng(seed)
    folders = ["", "a", "a/b", "c", "c/d/e"]
    keys = []
    for i in range(count):
        fmt, ext, mode = KINDS[i % len(KINDS)]
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        key = "/".join(p for p in (folders[i % len(folders)], f"img{i:04d}{ext}") if p)
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image(rng, fmt, mode, height, width))
        keys.append(key)
    return keys


def plant_bad_files(root) -> dict[str, str]:
    """Zero bytes, truncated, not an image, pixel bomb; returns {relative path: what it is}."""
    good = make_image(np.random.default_rng(99), "PNG", "RGB", 40, 40)
    bad = {
        "bad/empty.png": b"",
        "bad/truncated.png": good[: len(good) // 2],
        "bad/not_an_image.jpg": b"these are notes, not pixels\n" * 10,
        "a/bomb.png": pixel_bomb_png(),
    }
    for key, data in bad.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return {k: "bad" for k in bad}


# -- a private mount namespace: small or read-only file systems without touching the machine's --
import os
import shutil
import subprocess


def run_in_private_mount(script: str, *, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the shell `script` in a mount namespace of its own, so it can mount a tmpfs (a tiny
    or read-only file system) that no other process sees and that vanishes with it.

    As root `unshare --mount` suffices; otherwise an unprivileged user namespace maps the
    user to root inside. Skips the calling test when neither is allowed here.
    """
    import pytest

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private mount namespace")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                                                 "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(prefix + ["sh", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
