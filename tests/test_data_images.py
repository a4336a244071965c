"""pipeline.data.images: per-mode decode policy, lossless encode round trips, bad files named."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import BadImageError, codes_to_unit, decode_codes, decode_image, encode_image, load_image_file

RNG = np.random.default_rng(0)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def _palette_image(transparent: bool = False) -> Image.Image:
    im = Image.fromarray(RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)).quantize(16)
    if transparent:
        im.info["transparency"] = 3
    return im


CASES = {
    "L": lambda: Image.fromarray(RNG.integers(0, 256, (9, 13), dtype=np.uint8)),
    "I;16": lambda: Image.fromarray(RNG.integers(0, 65536, (9, 13), dtype=np.uint16)),
    "LA": lambda: Image.fromarray(RNG.integers(0, 256, (9, 13, 2), dtype=np.uint8)),
    "RGB": lambda: Image.fromarray(RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)),
    "RGBA": lambda: Image.fromarray(RNG.integers(0, 256, (9, 13, 4), dtype=np.uint8)),
}


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("mode", sorted(CASES))
def test_round_trip_is_lossless(mode, fmt):
    im = CASES[mode]()
    assert im.mode == mode
    img = decode_image(_save(im, fmt), f"x.{fmt}")
    channels = 1 if mode in ("L", "I;16", "LA") else 3
    assert img.pixels.shape == (channels, 9, 13) and img.pixels.dtype == torch.float32
    assert (img.alpha is not None) == mode.endswith("A")
    assert img.bit_depth == (16 if mode == "I;16" else 8)
    assert img.format == fmt and img.mode == mode
    assert 0.0 <= float(img.pixels.min()) and float(img.pixels.max()) <= 1.0
    back = Image.open(io.BytesIO(encode_image(img, img.pixels)))
    assert back.format == fmt and back.mode == mode
    np.testing.assert_array_equal(np.asarray(back), np.asarray(im))


@pytest.mark.parametrize("mode", sorted(CASES) + ["P"])
def test_decode_codes_agrees_with_decode_image(mode):
    im = _palette_image(transparent=True) if mode == "P" else CASES[mode]()
    data = _save(im, "PNG", **({"transparency": 3} if mode == "P" else {}))
    img = decode_image(data, "x.png")
    pixels, alpha, depth = decode_codes(data, "x.png")
    assert depth == img.bit_depth
    assert pixels.dtype == (torch.uint8 if depth == 8 else torch.int32)
    assert torch.equal(codes_to_unit(pixels, depth), img.pixels)
    assert (alpha is None) == (img.alpha is None)
    if alpha is not None:
        assert torch.equal(codes_to_unit(alpha, depth), img.alpha)


def test_16bit_keeps_its_range():
    arr = np.array([[0, 1, 257, 65534, 65535]], dtype=np.uint16)
    img = decode_image(_save(Image.fromarray(arr), "PNG"), "a.png")
    expected = torch.tensor(arr.astype(np.float64) / 65535.0)
    torch.testing.assert_close(img.pixels[0].double(), expected, atol=1e-7, rtol=0)
    # 1 and 257 stay distinct: no reduction to 8 bits
    assert img.pixels[0, 0, 1] < img.pixels[0, 0, 2]


def test_16bit_colour_png_is_read_at_8_bits_with_a_warning():
    h, w = 3, 4
    a = RNG.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))
    with pytest.warns(UserWarning, match="rgb48.png: 16-bit colour PNG read at 8 bits"):
        img = decode_image(data, "rgb48.png")
    assert img.bit_depth == 8
    np.testing.assert_array_equal((img.pixels * 255).round().numpy().transpose(1, 2, 0), a >> 8)


def test_palette_becomes_rgb_and_is_written_as_rgb():
    im = _palette_image()
    img = decode_image(_save(im, "PNG"), "p.png")
    assert img.mode == "P" and img.pixels.shape[0] == 3 and img.alpha is None
    back = Image.open(io.BytesIO(encode_image(img, img.pixels)))
    assert back.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(back), np.asarray(im.convert("RGB")))


def test_palette_with_transparency_keeps_alpha():
    im = _palette_image(transparent=True)
    img = decode_image(_save(im, "PNG", transparency=3), "p.png")
    assert img.alpha is not None
    expected = np.asarray(im.convert("RGBA"))
    np.testing.assert_array_equal((img.alpha[0].numpy() * 255).round(), expected[..., 3])
    back = Image.open(io.BytesIO(encode_image(img, img.pixels)))
    assert back.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(back), expected)


def test_alpha_is_put_back_with_new_pixels():
    im = CASES["RGBA"]()
    img = decode_image(_save(im, "PNG"), "a.png")
    new = 1.0 - img.pixels
    back = np.asarray(Image.open(io.BytesIO(encode_image(img, new))))
    np.testing.assert_array_equal(back[..., 3], np.asarray(im)[..., 3])
    np.testing.assert_array_equal(back[..., :3], 255 - np.asarray(im)[..., :3])


def test_grey_source_with_three_channels_is_written_as_their_mean():
    im = CASES["L"]()
    img = decode_image(_save(im, "PNG"), "g.png")
    three = torch.cat([img.pixels, img.pixels, img.pixels])
    back = np.asarray(Image.open(io.BytesIO(encode_image(img, three))))
    np.testing.assert_array_equal(back, np.asarray(im))


def test_encode_clips_and_rounds():
    img = decode_image(_save(CASES["L"](), "PNG"), "g.png")
    x = torch.full_like(img.pixels, 0.5)
    x[0, 0, 0], x[0, 0, 1] = -3.0, 7.0
    back = np.asarray(Image.open(io.BytesIO(encode_image(img, x))))
    assert back[0, 0] == 0 and back[0, 1] == 255 and back[1, 1] == round(0.5 * 255)


def test_jpeg_stays_jpeg_and_close():
    im = Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8))
    img = decode_image(_save(im, "JPEG", quality=95), "a.jpg")
    assert img.format == "JPEG" and img.pixels.shape == (3, 16, 16)
    back = Image.open(io.BytesIO(encode_image(img, img.pixels)))
    assert back.format == "JPEG" and back.mode == "RGB"
    assert np.abs(np.asarray(back).astype(int) - 120).max() <= 2


def test_exif_orientation_is_applied_and_not_written_back():
    arr = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = decode_image(_save(im, "JPEG", exif=exif.tobytes(), quality=100), "r.jpg")
    assert img.pixels.shape == (3, 10, 6)  # upright: width and height swapped
    back = Image.open(io.BytesIO(encode_image(img, img.pixels)))
    assert back.size == (6, 10)
    assert back.getexif().get(0x0112) in (None, 1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pixel_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row only: the rest would be a bomb
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


BAD_FILES = {
    "zero bytes": (b"", "empty"),
    "text file": (b"this is not an image\n", "not a recognized image"),
    "truncated png": (None, "truncated"),
    "pixel bomb": (None, "decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_named_errors(case):
    data, reason = BAD_FILES[case]
    if case == "truncated png":
        full = _save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
        data = full[: len(full) // 2]
    elif case == "pixel bomb":
        data = pixel_bomb_png()
    with pytest.raises(BadImageError) as info:
        decode_image(data, "folder/bad.png")
    assert info.value.name == "folder/bad.png"
    assert reason in info.value.reason.lower()
    assert "folder/bad.png" in str(info.value)


def test_own_pixel_limit_applies_before_decoding():
    data = _save(Image.fromarray(np.zeros((20, 20), dtype=np.uint8)), "PNG")
    assert decode_image(data, "ok.png", max_pixels=400).pixels.shape == (1, 20, 20)
    with pytest.raises(BadImageError, match="exceeds the limit of 399"):
        decode_image(data, "big.png", max_pixels=399)


def test_bad_image_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(BadImageError("a.png", "broken")))
    assert (e.name, e.reason, str(e)) == ("a.png", "broken", "a.png: broken")


def test_load_image_file_names_the_path(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((3, 4), dtype=np.uint8)).save(path)
    assert load_image_file(path).pixels.shape == (1, 3, 4)
    with pytest.raises(BadImageError, match="missing.png"):
        load_image_file(tmp_path / "missing.png")


def _frames(count: int) -> list:
    return [Image.fromarray(RNG.integers(0, 256, (10, 14, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("fmt, kind", [("GIF", "animated GIF"), ("WEBP", "animated WEBP"), ("PNG", "animated PNG"),
                                       ("TIFF", "multi-page TIFF")])
def test_multi_frame_images_fail_with_a_clear_reason(fmt, kind):
    """Decided: multi-frame images fail (denoising the first frame alone used to pass as done)."""
    frames = _frames(3)
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(BadImageError, match=f"{kind} with 3 frames: multi-frame images are not supported"):
        decode_image(data, "movie." + fmt.lower())
    with pytest.raises(BadImageError, match="multi-frame"):
        decode_codes(data, "movie." + fmt.lower())
    assert decode_image(_save(frames[0], fmt), "still").pixels.shape == (3, 10, 14)  # one frame is fine


def test_a_camera_mpo_is_its_first_frame_written_back_as_jpeg():
    photo, preview = _frames(2)
    data = _save(photo, "MPO", save_all=True, append_images=[preview], quality=95)
    image = decode_image(data, "camera.jpg")
    assert image.format == "JPEG" and image.pixels.shape == (3, 10, 14)
    assert Image.open(io.BytesIO(encode_image(image, image.pixels))).format == "JPEG"


def _png_with_rows(width: int, height: int, rows: int, colour_type: int = 2, interlace: int = 0,
                   seed: int = 0) -> bytes:
    """A PNG whose header claims width x height 8-bit pixels but whose (complete) zlib
    stream holds only `rows` rows: the file of issue 34, row 13."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    rng = np.random.default_rng(seed)
    raw = b"".join(b"\x00" + rng.integers(0, 256, width * channels, dtype=np.uint8).tobytes() for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def test_a_png_whose_data_ends_early_fails_by_name_fast():
    """Issue 34, row 13: a 290-byte PNG whose header claims 9000x9000 (4 rows of data) was
    decoded as a black image and denoised for 125 s of CPU."""
    import time

    bomb = _png_with_rows(9000, 9000, 4, colour_type=0, seed=1)
    assert len(bomb) < 40_000
    started = time.perf_counter()
    with pytest.raises(BadImageError, match=r"^IMG_0001.png: truncated: .*4 of its 9000 rows") as info:
        decode_image(bomb, "IMG_0001.png")
    assert time.perf_counter() - started < 1.0 and info.value.name == "IMG_0001.png"
    with pytest.raises(BadImageError, match="truncated"):
        decode_codes(bomb, "IMG_0001.png")
    short = _png_with_rows(64, 64, 4)  # enough data that only counting the rows tells
    with pytest.raises(BadImageError, match=r"truncated: .*4 of its 64 rows"):
        decode_image(short, "short.png")
    for colour_type in (0, 2, 6):
        whole = _png_with_rows(24, 16, 16, colour_type=colour_type)
        assert decode_image(whole, "whole.png").size == (16, 24)
    assert decode_image(_png_with_rows(24, 16, 16, interlace=0), "x.png").size == (16, 24)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((33, 17, 3), np.uint8)).save(buffer, format="PNG", interlace=True)
    assert decode_image(buffer.getvalue(), "interlaced.png").size == (33, 17)
