"""Large images: tiled inference agrees with whole-image inference, and an 8000x6000
image is denoised (decode, tiled denoise, encode) within 2 GB of peak memory."""
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from n2n_core import build_model, save_checkpoint
from pipeline.inference import denoise_image
from tests.denoise_helpers import natural_array

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_1024_tiled_with_256_tiles_matches_whole_image():
    model = build_model("unet", depth=3, width=16, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(natural_array(rng, 1024, 1024, 3)).permute(2, 0, 1).float().contiguous()
    whole = denoise_image(model, pixels)
    tiled = denoise_image(model, pixels, tile=256, overlap=32)
    assert tiled.shape == whole.shape == (3, 1024, 1024)
    difference = (tiled - whole).abs().max().item()
    assert difference <= 1 / 255, f"tiled differs from whole-image inference by {difference * 255:.3f}/255"


def write_big_png(path, height=6000, width=8000):
    """A smooth RGB test image of height x width, built row band by row band."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    xx = np.arange(width, dtype=np.float32)[None, :] / width
    for y0 in range(0, height, 500):
        yy = np.arange(y0, min(y0 + 500, height), dtype=np.float32)[:, None] / width
        band = np.stack([np.sin(40 * xx + 0 * yy), np.cos(30 * yy + 0 * xx), np.sin(20 * (xx + yy))], -1) * 100 + 128
        image.paste(Image.fromarray(band.astype(np.uint8)), (0, y0))
    image.save(path, format="PNG", compress_level=1)


@pytest.mark.slow
def test_8000x6000_image_peak_memory_under_2gb(tmp_path):
    model = build_model("unet", depth=3, width=16, generator=torch.Generator().manual_seed(1))
    checkpoint = tmp_path / "model.n2n"
    save_checkpoint(checkpoint, model)
    source, target = tmp_path / "big.png", tmp_path / "big_out.png"
    write_big_png(source)
    script = textwrap.dedent(f"""
        from n2n_core import load_checkpoint
        from pipeline.data.images import decode_image, encode_image
        from pipeline.inference import denoise_image
        model = load_checkpoint({str(checkpoint)!r}).model
        data = open({str(source)!r}, "rb").read()
        decoded = decode_image(data, "big.png")
        del data
        out = denoise_image(model, decoded.pixels, tile=512, overlap=32, inplace=True)
        assert out.shape == (3, 6000, 8000), out.shape
        open({str(target)!r}, "wb").write(encode_image(decoded, out))
    """)
    # The measuring process runs the job as its only child, so RUSAGE_CHILDREN is the job's peak.
    measure = (
        "import resource, subprocess, sys; "
        "subprocess.run([sys.executable, '-c', sys.argv[1]], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", measure, script], cwd=ROOT, check=True, timeout=1200,
                            capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    peak_kib = int(result.stdout.split()[-1])
    assert target.stat().st_size > 0
    assert 100 * 1024 < peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB (limit 2048 MiB)"
