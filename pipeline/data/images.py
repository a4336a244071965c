"""Decode encoded image bytes into tensors and encode tensors back, one policy per mode.

Decoding (`decode_image`) turns the bytes of one file into a `DecodedImage`:

| PIL mode on disk                 | `pixels`         | `alpha`   | `bit_depth` | written back as        |
| -------------------------------- | ---------------- | --------- | ----------- | ---------------------- |
| `L` (8-bit grey), `1` (bilevel)  | (1, H, W)        | None      | 8           | `L`                    |
| `LA`                             | (1, H, W)        | (1, H, W) | 8           | `LA`                   |
| `I;16`, `I;16B`, `I;16L`, `I`    | (1, H, W)        | None      | 16          | `I;16` (PNG, TIFF)     |
| `RGB`, `CMYK`, `YCbCr`, `LAB`... | (3, H, W)        | None      | 8           | `RGB`                  |
| `RGBA`, `PA`                     | (3, H, W)        | (1, H, W) | 8           | `RGBA`                 |
| `P` (palette)                    | (3, H, W)        | if transparency | 8     | `RGB` / `RGBA`         |

- Values are float32 in [0, 1]: the 8-bit code k becomes k / 255, the 16-bit code k / 65535,
  so `encode_image(img, img.pixels)` rounds back to exactly the same codes (lossless for
  PNG and TIFF, whose pixels survive the round trip bit for bit).
- Palette images are expanded to RGB (RGBA when the palette has a transparent entry) and
  written back as RGB(A): a denoised image has far more than 256 colours, so re-quantizing
  to a palette would throw the denoising away. GIF, which cannot hold RGB, is re-quantized
  by Pillow on save (lossy; prefer PNG output for palette inputs).
- CMYK and the other colour spaces are converted to RGB and written back as RGB.
- 16-bit colour files (48/64-bit PNG or TIFF) are read by Pillow at 8 bits per channel;
  they come back as 8-bit RGB(A) (a Pillow limitation) and decoding warns about it.
- EXIF orientation is applied on decode (`ImageOps.exif_transpose`), so `pixels` are upright
  as a viewer shows them. On output the upright pixels are written *without* an orientation
  tag (EXIF is not copied), so every viewer shows the same upright image; the raw sensor
  orientation is not restored.
- An ICC profile, if any, is carried over to the output.
- Other modes (32-bit float `F`, ...) are rejected with a `BadImageError`.
- Multi-frame images (animated GIF, WebP or PNG, multi-page TIFF) are rejected with a
  `BadImageError` that says how many frames: denoising only the first would silently
  drop the rest, and writing animations back is not supported. The exception is MPO
  (the JPEG variant some cameras write, with preview images after the photo): its
  first frame is the photo, decoded as a JPEG and written back as a plain JPEG.
- A pixel-count limit guards against decompression bombs: an image whose header declares
  more than `max_pixels` pixels is rejected before any pixel is decoded. Pillow's own
  `DecompressionBombWarning` / `DecompressionBombError` are turned into `BadImageError` too.
- A PNG whose pixel data ends before the rows its header declares (a complete zlib stream
  that is too short: Pillow decodes it without complaint, the missing rows black) fails as
  "truncated" before it is decoded: its data is inflated once and only counted
  (`png_shortfall`), so a 290-byte file claiming 9000 x 9000 fails in milliseconds.

Every failure to decode raises `BadImageError(name, reason)`, whose message names the file.
"""
from __future__ import annotations

import dataclasses
import io
import math
import pathlib
import struct
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default limit (about 89.5 megapixels, a 9.4k x 9.4k photo). Pillow's check
# (Image.MAX_IMAGE_PIXELS, a global we never change) also applies: the effective limit is
# the smaller of the two, and raising it beyond Pillow's needs the application to raise both.
DEFAULT_MAX_PIXELS = 89_478_485

_GREY8 = {"L", "1"}
_GREY16 = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_SAVE_FORMAT_OPTIONS = {
    "JPEG": {"quality": 95, "subsampling": 0},
    "WEBP": {"lossless": True},
}
_LOSSLESS_TIFF = {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"}


class BadImageError(ValueError):
    """An image that cannot be decoded (or is too large); `name` is the file or key, `reason` why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # keep (name, reason) across pickling (Ray ships exceptions)
        return (type(self), (self.name, self.reason))


@dataclasses.dataclass
class DecodedImage:
    """One decoded image and what is needed to write new pixels back in the same form.

    Shape:
        pixels: (C, H, W) float32 in [0, 1], C = 1 (grey) or 3 (RGB).
        alpha: (1, H, W) float32 in [0, 1], or None.

    Attributes:
        format: Pillow format name of the source ("PNG", "JPEG", "TIFF", ...).
        bit_depth: 8 or 16 (bits per channel of `pixels` as stored on disk).
        mode: the original PIL mode ("L", "I;16", "RGB", "RGBA", "P", ...).
        save_options: extra keyword arguments for `PIL.Image.save` (ICC profile, TIFF
            compression) so the output resembles the input.
    """

    pixels: torch.Tensor
    alpha: torch.Tensor | None
    format: str
    bit_depth: int
    mode: str
    save_options: dict = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return (int(self.pixels.shape[1]), int(self.pixels.shape[2]))


def _code_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 / uint16 codes -> (C, H, W) uint8 (8-bit) or int32 (16-bit)."""
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    dtype = np.uint8 if array.dtype == np.uint8 else np.int32
    return torch.from_numpy(np.array(array, dtype=dtype, order="C", copy=True))  # own, writable memory


def codes_to_unit(codes: torch.Tensor, bit_depth: int) -> torch.Tensor:
    """Integer codes -> float32 code / (2^bit_depth - 1), the exact value `decode_image` gives."""
    return codes.to(torch.float32).div_(255.0 if bit_depth == 8 else 65535.0)


def _to_codes(x: torch.Tensor, bit_depth: int, band_rows: int = 256) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W) or (H, W, C) uint8 / uint16 codes, rounded.

    Converted a band of rows at a time (float64 per band), so an 8000x6000 image needs its
    codes plus a few MB, not several float64 copies of the whole image.
    """
    scale = 255.0 if bit_depth == 8 else 65535.0
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    C, H, W = x.shape
    out = np.empty((H, W, C), dtype=dtype)
    for y0 in range(0, H, band_rows):
        band = x[:, y0:y0 + band_rows].detach().to("cpu", torch.float64)
        codes = band.clamp_(0.0, 1.0).mul_(scale).round_().to(torch.int32).numpy()  # (C, h, W)
        out[y0:y0 + band_rows] = codes.transpose(1, 2, 0)
    return out[..., 0] if C == 1 else out


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise BadImageError(name, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(name, f"decompression bomb guard: {e}") from None
        except UnidentifiedImageError:
            raise BadImageError(name, "not a recognized image format") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImageError(name, f"cannot open: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImageError(
            name, f"{w} x {h} = {w * h} pixels exceeds the limit of {max_pixels} (decompression bomb guard)"
        )
    if w == 0 or h == 0:
        raise BadImageError(name, f"empty image ({w} x {h})")
    if im.format == "PNG":
        short = png_shortfall(data)
        if short:
            raise BadImageError(name, short)
    if getattr(im, "is_animated", False) and im.format != "MPO":
        try:
            frames = f"{im.n_frames} frames"
        except Exception:
            frames = "several frames"
        kind = "multi-page" if im.format == "TIFF" else "animated"
        raise BadImageError(name, f"{kind} {im.format} with {frames}: multi-frame images are not supported "
                                  f"(extract the frames first)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(name, f"decompression bomb guard: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise BadImageError(name, f"cannot decode ({im.format}): {e}") from None
    return im


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_shortfall(data: bytes) -> str:
    """Why a PNG's pixel data is shorter than its header needs ("" when it is not, or the
    file is malformed in a way Pillow reports itself). Counts the inflated bytes of the
    IDAT chunks without keeping them: memory stays at one chunk, time at one inflate."""
    try:
        if data[12:16] != b"IHDR":
            return ""
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        bits = _PNG_CHANNELS[colour] * depth
        if interlace:
            passes = [(math.ceil((width - x0) / dx), math.ceil((height - y0) / dy))
                      for x0, y0, dx, dy in _ADAM7 if width > x0 and height > y0]
        else:
            passes = [(width, height)]
        needed = sum(h * (1 + math.ceil(w * bits / 8)) for w, h in passes)
        inflate, produced, position = zlib.decompressobj(), 0, 8
        while position + 8 <= len(data) and produced < needed:
            length, kind = struct.unpack(">I4s", data[position:position + 8])
            chunk = data[position + 8:position + 8 + length]
            position += 12 + length
            if kind == b"IEND":
                break
            if kind != b"IDAT":
                continue
            while chunk and produced < needed:
                produced += len(inflate.decompress(chunk, min(1 << 20, needed - produced)))
                chunk = inflate.unconsumed_tail
    except (KeyError, struct.error, zlib.error):
        return ""
    if produced >= needed:
        return ""
    if interlace:
        return (f"truncated: its pixel data holds {produced} of the {needed} bytes its {width} x {height} "
                f"header needs")
    rows = produced // (1 + math.ceil(width * bits / 8))
    return f"truncated: its pixel data holds {rows} of its {height} rows (the header claims {width} x {height})"


def _open_upright(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, str, str, dict]:
    """Opened, size-checked, fully loaded and EXIF-rotated image; its format, mode, save options."""
    im = _open_checked(data, name, max_pixels)
    fmt = im.format or "PNG"
    if fmt == "MPO":  # a camera JPEG with previews appended: the first frame is the photo
        fmt = "JPEG"
    mode = im.mode
    options: dict = {}
    if im.info.get("icc_profile"):
        options["icc_profile"] = im.info["icc_profile"]
    if fmt == "TIFF":
        compression = im.info.get("compression", "raw")
        options["compression"] = compression if compression in _LOSSLESS_TIFF else "tiff_lzw"
    if mode in ("RGB", "RGBA") and _stored_bits(im, data) == 16:
        warnings.warn(f"{name}: 16-bit colour {fmt} read at 8 bits per channel (Pillow limitation)")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # a malformed EXIF block: keep the pixels as stored
        warnings.warn(f"{name}: EXIF orientation ignored ({e})")
    return im, fmt, mode, options


def _stored_bits(im: Image.Image, data: bytes) -> int:
    """Bits per channel as stored in a PNG or TIFF header (8 when unknown)."""
    if im.format == "PNG" and len(data) > 25:
        return data[24]  # IHDR bit depth: signature (8) + length (4) + "IHDR" (4) + width, height (8)
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258, 8)  # BitsPerSample
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


def decode_codes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Decode to integer codes with the same policy as `decode_image`, without floats.

    Shape:
        returns (pixels (C, H, W), alpha (1, H, W) or None, bit_depth); uint8 codes for
        8-bit images, int32 codes 0..65535 for 16-bit ones. `codes_to_unit(pixels, bit_depth)`
        equals `decode_image(...).pixels`.
    """
    im, _, mode, _ = _open_upright(data, name, max_pixels)
    try:
        return _decode_pixels(im, name, mode)
    except (OSError, ValueError) as e:
        if isinstance(e, BadImageError):
            raise
        raise BadImageError(name, f"cannot convert mode {mode}: {e}") from None


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode one encoded image with the per-mode policy of this module.

    Args:
        data: the encoded file's bytes.
        name: file name or key, used in error messages.
        max_pixels: largest accepted width x height.

    Raises:
        BadImageError: empty, truncated, unrecognized, too large or unsupported.
    """
    im, fmt, mode, options = _open_upright(data, name, max_pixels)
    try:
        pixels, alpha, depth = _decode_pixels(im, name, mode)
    except (OSError, ValueError) as e:
        if isinstance(e, BadImageError):
            raise
        raise BadImageError(name, f"cannot convert mode {mode}: {e}") from None
    return DecodedImage(pixels=codes_to_unit(pixels, depth),
                        alpha=None if alpha is None else codes_to_unit(alpha, depth),
                        format=fmt, bit_depth=depth, mode=mode, save_options=options)


def _decode_pixels(im: Image.Image, name: str, mode: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The per-mode policy: (pixel codes (C, H, W), alpha codes (1, H, W) or None, bit depth)."""
    if mode in _GREY8:
        return _code_tensor(np.asarray(im if im.mode == "L" else im.convert("L"))), None, 8
    if mode == "LA":
        arr = np.asarray(im)  # (H, W, 2)
        return _code_tensor(arr[..., 0]), _code_tensor(arr[..., 1]), 8
    if mode in _GREY16:
        arr = np.asarray(im)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise BadImageError(name, f"32-bit integer image with values outside 0..65535 ({arr.min()}..{arr.max()})")
        return _code_tensor(arr.astype(np.int32)), None, 16
    if mode in ("RGBA", "PA") or (mode == "P" and "transparency" in im.info):
        arr = np.asarray(im if im.mode == "RGBA" else im.convert("RGBA"))  # (H, W, 4)
        return _code_tensor(arr[..., :3]), _code_tensor(arr[..., 3]), 8
    if mode in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return _code_tensor(np.asarray(im if im.mode == "RGB" else im.convert("RGB"))), None, 8
    raise BadImageError(name, f"unsupported image mode {mode}")


def encode_image(image: DecodedImage, pixels: torch.Tensor) -> bytes:
    """Encode new pixels in the format, channel layout and bit depth of `image`, alpha put back.

    Shape:
        pixels: (C, H, W) float in [0, 1] (clipped, rounded to the bit depth); C = 1 or 3.
        A grey source given 3 channels (an RGB model's output) is written as their mean.
    """
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"pixels must be (C, H, W) with C = 1 or 3, got {tuple(pixels.shape)}")
    grey = image.pixels.shape[0] == 1
    if grey and pixels.shape[0] == 3:
        pixels = pixels.mean(dim=0, keepdim=True)
    elif not grey and pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    if image.alpha is not None and tuple(image.alpha.shape[1:]) != tuple(pixels.shape[1:]):
        raise ValueError(f"pixels {tuple(pixels.shape)} do not match alpha {tuple(image.alpha.shape)}")
    depth = image.bit_depth
    if grey and depth == 16:
        im = Image.fromarray(_to_codes(pixels, 16))  # mode I;16
    else:
        channels = pixels if image.alpha is None else torch.cat([pixels, image.alpha], dim=0)
        im = Image.fromarray(_to_codes(channels, 8))  # (H, W) L, (H, W, 2) LA, 3 RGB, 4 RGBA
    fmt = image.format
    options = dict(_SAVE_FORMAT_OPTIONS.get(fmt, {}))
    options.update(image.save_options)
    if fmt == "JPEG" and im.mode in ("LA", "RGBA"):
        im = im.convert(im.mode[:-1])  # JPEG holds no alpha
    if fmt == "GIF" and im.mode not in ("L", "P"):
        im = im.convert("RGB").quantize(256)
    out = io.BytesIO()
    try:
        im.save(out, format=fmt, **options)
    except (KeyError, OSError, ValueError) as e:
        raise ValueError(f"cannot encode {im.mode} as {fmt}: {e}") from None
    return out.getvalue()


def load_image_file(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode one local file; errors name the path."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImageError(str(path), f"cannot read: {e}") from None
    return decode_image(data, str(path), max_pixels=max_pixels)
