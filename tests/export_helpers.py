"""Shared by the export tests: freshly trained checkpoints, real photos, the ONNX Runtime recipe."""
from __future__ import annotations

import numpy as np
import torch

from n2n_core import Adam, MSELoss, build_model, save_checkpoint

# (architecture, kwargs): an RGB U-Net with residual output, and a grey seed network
TRAINED = {
    "unet-rgb": ("unet", dict(depth=2, width=6, residual=True)),
    "seed-deep-grey": ("seed-deep", dict(width=4, in_channels=1, out_channels=1)),
}


def train_checkpoint(path, key: str, steps: int = 25):
    """A checkpoint trained here by Noise2Noise steps on noisy pairs of random smooth images
    (with its optimizer state, as `n2n train` writes them); returns the model."""
    name, kwargs = TRAINED[key]
    generator = torch.Generator().manual_seed(1)
    model = build_model(name, generator=generator, **kwargs)
    channels = kwargs.get("in_channels", 3)
    loss_fn, optimizer = MSELoss(), Adam(model.parameters(), lr=1e-2)
    clean = torch.nn.functional.avg_pool2d(torch.rand(8, channels, 36, 36, generator=generator), 5, 1)  # (8, C, 32, 32)
    for _ in range(steps):
        noisy_input = clean + 0.1 * torch.randn(clean.shape, generator=generator)
        noisy_target = clean + 0.1 * torch.randn(clean.shape, generator=generator)
        optimizer.zero_grad()
        loss_fn(model(noisy_input), noisy_target)
        model.backward(loss_fn.backward())
        optimizer.step()
    save_checkpoint(path, model, optimizer, step=steps, config={"noise": "gaussian:25"})
    return model


def photos(channels: int) -> list[np.ndarray]:
    """Real photos (scikit-image's samples) at odd sizes, (H, W, channels) float32 in [0, 1] with noise."""
    import skimage.data

    rng = np.random.default_rng(0)
    out = []
    for name, (top, left, height, width) in (("astronaut", (10, 150, 97, 131)), ("coffee", (30, 200, 77, 45)),
                                             ("chelsea", (5, 5, 5, 9))):
        image = getattr(skimage.data, name)()[top:top + height, left:left + width].astype(np.float32) / 255
        if channels == 1:
            image = image.mean(axis=2, keepdims=True)
        noisy = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1).astype(np.float32)
        out.append(noisy)
    return out


def onnx_denoise(session, image: np.ndarray, multiple: int) -> np.ndarray:
    """docs/export.md's ONNX Runtime recipe: (H, W, C) float32 in [0, 1] of any size -> denoised."""
    height, width = image.shape[:2]
    x = np.pad(image.transpose(2, 0, 1)[None], ((0, 0), (0, 0), (0, -height % multiple), (0, -width % multiple)),
               mode="reflect")
    y = session.run(None, {"input": x.astype(np.float32)})[0]
    return np.clip(y[0, :, :height, :width].transpose(1, 2, 0), 0, 1)


def n2n_denoise(model, image: np.ndarray) -> np.ndarray:
    """n2n's own result for the same image: the bulk job's padding, one whole-image pass."""
    from pipeline.inference.tiling import denoise_image

    pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return denoise_image(model, pixels, tile=None).numpy().transpose(1, 2, 0)
