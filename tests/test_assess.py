"""`n2n assess`: the no-reference residual-noise figure on noisy photos."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.quality.assess import AssessConfig, assess, estimated_sigma
from pipeline.cli import main
from pipeline.demo import sample_photo


class Identity:
    """A 'denoiser' that changes nothing (n2n's inference interface: eval/train, parameters)."""

    training = False
    size_multiple = 1
    in_channels = 3

    def __call__(self, x):
        return x.clone()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def parameters(self):
        return []


@pytest.fixture(scope="module")
def noisy_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(0)
    for name in ("chelsea", "coffee"):
        clean = sample_photo(name, 96).astype(np.float64)
        noisy = np.clip(np.round(clean + rng.normal(0, 20, clean.shape)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{name}.png")
    (folder / "zz-broken.png").write_bytes(b"no image")
    return folder


def test_the_wavelet_estimate_finds_a_known_sigma():
    flat = torch.full((3, 128, 128), 0.5, dtype=torch.float64)
    noisy = flat + torch.randn(flat.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 12 / 255
    assert estimated_sigma(noisy) == pytest.approx(12, rel=0.05)


def test_identity_keeps_all_the_noise_and_the_default_model_removes_most(noisy_photos):
    same = assess(AssessConfig(data=str(noisy_photos)), model=Identity(), progress=False)
    assert [p.key for p in same.photos] == ["chelsea.png", "coffee.png"]
    assert [k for k, _ in same.failed] == ["zz-broken.png"]
    assert all(p.sigma_in > 10 for p in same.photos)
    assert same.median_kept == pytest.approx(1.0, abs=1e-9)
    cleaned = assess(AssessConfig(data=str(noisy_photos)), progress=False)
    assert cleaned.median_kept < 0.35, cleaned.table()
    half = assess(AssessConfig(data=str(noisy_photos), strength=0.5), progress=False)
    assert cleaned.median_kept < half.median_kept < 1.0


def test_cli_json_strip_and_errors(noisy_photos, tmp_path):
    strip = tmp_path / "strip.png"
    result = CliRunner().invoke(main, ["assess", str(noisy_photos), "--json", "--strip", str(strip), "--limit", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["photos"]) == 2 and 0 < report["median_kept"] < 1
    assert strip.stat().st_size > 0
    for args in (["--strength", "1.5"], ["--limit", "0"]):
        bad = CliRunner().invoke(main, ["assess", str(noisy_photos)] + args)
        assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
    missing = CliRunner().invoke(main, ["assess", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output
