"""The Python API: `Denoiser.load(...).denoise(x)` for every kind of input gives the kind back,
with n2n's own result (the bulk job's `denoise_image`) inside."""
import numpy as np
import pytest
import torch
from PIL import Image

from n2n import Denoiser
from pipeline.errors import UsageError
from pipeline.inference.tiling import denoise_image
from tests.export_helpers import train_checkpoint


@pytest.fixture(scope="module")
def denoiser():
    return Denoiser.load("default", device="cpu")


@pytest.fixture(scope="module")
def noisy():
    """A real photo crop with noise: (H, W, 3) float32 in [0, 1], odd size."""
    import skimage.data

    rng = np.random.default_rng(0)
    clean = skimage.data.astronaut()[30:51, 170:199].astype(np.float32) / 255  # 21 x 29
    return np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)


def _reference(denoiser, chw: torch.Tensor, **settings) -> torch.Tensor:
    """n2n's own result: (C, H, W) float32 in [0, 1]."""
    options = dict(tile=512, overlap=32, self_ensemble=False, strength=1.0)
    options.update(settings)
    return denoise_image(denoiser.model, chw.to(torch.float32), tile=options["tile"] or None,
                         overlap=options["overlap"], self_ensemble=options["self_ensemble"],
                         strength=options["strength"])


def _codes(x: torch.Tensor, scale: float) -> np.ndarray:
    return torch.round(x.clamp(0, 1) * scale).to(torch.int64).numpy()


def test_numpy_uint8_rgb(denoiser, noisy):
    image = np.rint(noisy * 255).astype(np.uint8)
    out = denoiser.denoise(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    expected = _codes(_reference(denoiser, torch.from_numpy(image).permute(2, 0, 1) / 255.0), 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(float) - image).mean() > 3  # it did change the noisy image


def test_numpy_uint16_grey(denoiser, noisy):
    image = np.rint(noisy.mean(axis=2) * 65535).astype(np.uint16)  # (H, W)
    out = denoiser.denoise(image)
    assert out.shape == image.shape and out.dtype == np.uint16
    pixels = torch.from_numpy(image.astype(np.float32))[None] / 65535.0
    np.testing.assert_array_equal(out, _codes(_reference(denoiser, pixels), 65535)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_float_keeps_dtype(denoiser, noisy, dtype):
    image = noisy.astype(dtype)
    out = denoiser.denoise(image)
    assert out.shape == image.shape and out.dtype == dtype
    expected = _reference(denoiser, torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)).numpy()
    np.testing.assert_allclose(out.astype(np.float32), expected.transpose(1, 2, 0).astype(dtype).astype(np.float32))


def test_numpy_grey_with_one_channel_and_alpha_untouched(denoiser, noisy):
    grey = np.rint(noisy.mean(axis=2, keepdims=True) * 255).astype(np.uint8)  # (H, W, 1)
    assert denoiser.denoise(grey).shape == grey.shape
    alpha = np.arange(grey.size, dtype=np.uint8).reshape(grey.shape)
    rgba = np.concatenate([np.rint(noisy * 255).astype(np.uint8), alpha], axis=2)  # (H, W, 4)
    out = denoiser.denoise(rgba)
    assert out.shape == rgba.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 3:], alpha)
    np.testing.assert_array_equal(out[..., :3], denoiser.denoise(rgba[..., :3]))
    la = np.concatenate([grey, alpha], axis=2)  # (H, W, 2): grey + alpha
    np.testing.assert_array_equal(denoiser.denoise(la)[..., 1:], alpha)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16", "I", "F", "P", "1"])
def test_pil_images_come_back_as_pil_images(denoiser, noisy, mode):
    rgb8 = np.rint(noisy * 255).astype(np.uint8)
    if mode in ("RGB", "P"):
        image = Image.fromarray(rgb8).convert(mode)
    elif mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb8, np.full(rgb8.shape[:2] + (1,), 200, np.uint8)], axis=2))
    elif mode in ("L", "LA", "1"):
        image = Image.fromarray(rgb8).convert(mode)
    elif mode == "I;16":
        image = Image.fromarray(np.rint(noisy.mean(axis=2) * 65535).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.rint(noisy.mean(axis=2) * 65535).astype(np.int32), mode="I")
    else:
        image = Image.fromarray(noisy.mean(axis=2).astype(np.float32), mode="F")
    assert image.mode == mode
    out = denoiser.denoise(image)
    assert isinstance(out, Image.Image) and out.size == image.size
    assert out.mode == {"P": "RGB", "1": "L"}.get(mode, mode)
    if mode in ("RGB", "L", "I;16"):  # the same codes as the numpy path
        np.testing.assert_array_equal(np.asarray(out), denoiser.denoise(np.asarray(image)))
    if mode == "RGBA":
        assert np.all(np.asarray(out)[..., 3] == 200)


def test_torch_tensors_keep_shape_dtype_and_device(denoiser, noisy):
    chw = torch.from_numpy(noisy).permute(2, 0, 1).contiguous()  # (3, H, W)
    out = denoiser.denoise(chw)
    assert out.shape == chw.shape and out.dtype == torch.float32 and out.device == chw.device
    torch.testing.assert_close(out, _reference(denoiser, chw), rtol=0, atol=0)
    batch = torch.stack([chw, chw.flip(-1)]).double()  # (2, 3, H, W) float64
    out = denoiser.denoise(batch)
    assert out.shape == batch.shape and out.dtype == torch.float64
    torch.testing.assert_close(out[1].float(), _reference(denoiser, chw.flip(-1)), rtol=0, atol=1e-7)
    grey = chw.mean(dim=0)  # (H, W)
    assert denoiser.denoise(grey).shape == grey.shape
    codes = torch.round(chw * 255).to(torch.uint8)
    out = denoiser.denoise(codes)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), _codes(_reference(denoiser, codes / 255.0), 255))
    codes16 = torch.round(grey * 65535).to(torch.uint16)
    out16 = denoiser.denoise(codes16)
    assert out16.dtype == torch.uint16 and out16.shape == codes16.shape
    wants_grad = chw.clone().requires_grad_(True)
    assert not denoiser.denoise(wants_grad).requires_grad


def test_settings_apply_per_denoiser_and_per_call(noisy):
    chw = torch.from_numpy(noisy).permute(2, 0, 1).contiguous()
    soft = Denoiser.load("default", device="cpu", strength=0.5, self_ensemble=True, tile=0)
    softened = soft.denoise(chw)
    torch.testing.assert_close(softened, _reference(soft, chw, strength=0.5, self_ensemble=True, tile=0),
                               rtol=0, atol=0)
    tiled = soft.denoise(chw, strength=1.0, self_ensemble=False, tile=16, overlap=0)
    torch.testing.assert_close(tiled, _reference(soft, chw, tile=16, overlap=0), rtol=0, atol=0)
    assert not torch.equal(softened, tiled)


def test_load_a_checkpoint_path(tmp_path):
    model = train_checkpoint(tmp_path / "grey.n2n", "seed-deep-grey", steps=2)
    denoiser = Denoiser.load(str(tmp_path / "grey.n2n"), device="cpu")
    assert denoiser.source == str(tmp_path / "grey.n2n") and denoiser.size_multiple == 16
    image = np.random.default_rng(0).random((21, 19), dtype=np.float32)
    out = denoiser.denoise(image)
    expected = denoise_image(model.eval(), torch.from_numpy(image)[None], tile=512)[0].numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((4, 4), np.int32), TypeError, "dtype int32; expected uint8, uint16 or float"),
    (np.zeros((4, 4, 5), np.uint8), ValueError, "5 channels"),
    (np.zeros((2, 4, 4, 3), np.uint8), ValueError, "shape (2, 4, 4, 3)"),
    (torch.zeros(4, 4, dtype=torch.int64), TypeError, "dtype torch.int64"),
    ([[0.5]], TypeError, "cannot denoise a list"),
    (np.zeros((0, 7, 3), np.uint8), ValueError, "an empty image (0 x 7 pixels)"),
])
def test_bad_inputs_are_named(denoiser, bad, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        denoiser.denoise(bad)


def test_bad_settings_and_models_are_named(denoiser, tmp_path):
    with pytest.raises(ValueError, match="strength must be a number from 0 to 1, got 2"):
        denoiser.denoise(np.zeros((4, 4), np.float32), strength=2)
    with pytest.raises(ValueError, match="tile must be"):
        Denoiser.load("default", tile=-1)
    with pytest.raises(UsageError, match=f"model {tmp_path}/none.n2n: cannot read file"):
        Denoiser.load(str(tmp_path / "none.n2n"))


def test_export_from_the_api_and_a_model_in_memory(tmp_path):
    from n2n_core import build_model, load_checkpoint

    model = build_model("seed", width=4, generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(model, device="cpu")
    assert denoiser.source is None and "in memory" in repr(denoiser)
    result = denoiser.export(tmp_path / "seed", format="torch")
    assert sorted(p.name for p in result.output.iterdir()) == ["n2n_model.py", "n2n_model.safetensors"]
    from pipeline.export.torch_model import load

    exported = load(result.output / "n2n_model.safetensors")
    x = torch.rand(1, 3, 8, 12)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="exists; n2n export never replaces anything"):
        denoiser.export(tmp_path / "seed", format="torch")


@pytest.mark.slow
def test_denoise_folder_with_a_model_in_memory(tmp_path):
    """The bulk job reads a model that only lives in memory from a temporary checkpoint."""
    model = train_checkpoint(tmp_path / "m.n2n", "unet-rgb", steps=2)
    (tmp_path / "in").mkdir()
    image = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    denoiser = Denoiser(model, device="cpu", tile=0)
    summary = denoiser.denoise_folder(tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert (summary.done, summary.failed) == (1, 0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), denoiser.denoise(image))
