"""The project installs exactly as README says, and every command then runs.

Decision (issue 34, row 7): `n2n assess` once failed after `pip install -e .` with
"PyWavelets is not installed": scikit-image needs it for `estimate_sigma` but does not
require it, and the test extra hid its absence (it arrives through `bm3d`). So this test
makes a fresh virtual environment *without* system site-packages, runs README's install
command in it (`pip install -e .`, no extras; torch==2.13.0 comes from pip's configured
index or cache, as in CI), then runs every `n2n` command's `--help` and one real, cheap
call of each on tiny images it makes itself. It is marked slow: the install takes a few
minutes and the calls about as long (Ray starts for denoise, demo and sweep), well within
CI's budget; the default suite stays fast.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from n2n_core import build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    ["data"], ["data", "pack"], ["data", "unpack"], ["data", "info"], ["data", "import-pkl"], ["data", "pairs"],
    ["data", "noisy"], ["train"], ["sweep"], ["denoise"], ["evaluate"], ["assess"], ["demo"], ["bench"],
    ["bench", "core"], ["average"], ["export"],
]


def _images(folder: Path, count: int, size: int = 32, seed: int = 0, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.random((4, 4, 3))
        pixels = np.kron(low, np.ones((size // 4, size // 4, 1)))
        pixels = np.clip(pixels + 0.05 * rng.standard_normal(pixels.shape), 0, 1)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory) -> Path:
    """A new venv holding the project as README installs it; returns its bin folder."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-e", str(ROOT)], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin"


def _n2n(bin_dir: Path, *args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([str(bin_dir / "n2n"), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_the_fresh_install_has_every_dependency_of_every_command(fresh_install, tmp_path):
    site = subprocess.run([str(fresh_install / "python"), "-c", "import sys; print(sys.flags.no_site, sys.path)"],
                          capture_output=True, text=True, check=True).stdout
    assert "site-packages" in site and str(ROOT / ".venv") not in site  # its own packages, not this venv's

    for command in COMMANDS:
        result = _n2n(fresh_install, *command, "--help", cwd=tmp_path, timeout=120)
        # click says "Usage:", the benchmarks that `n2n bench` starts (argparse) "usage:"
        assert result.returncode == 0 and "usage:" in result.stdout.lower(), (command, result.stdout + result.stderr)

    clean = _images(tmp_path / "clean", 3)
    bursts = tmp_path / "bursts"
    _images(bursts / "scene", 2, seed=1)
    tiny = build_model("unet", depth=2, width=8, generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "a.n2n", tiny)
    save_checkpoint(tmp_path / "b.n2n", tiny)
    pairs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.save((pairs, pairs.clone()), tmp_path / "course.pkl")
    calls = [
        ["data", "noisy", "clean", "noisy", "--no-progress"],
        ["data", "pack", "noisy", "noisy.parquet", "--no-progress"],
        ["data", "info", "noisy.parquet", "--no-progress"],
        ["data", "unpack", "noisy.parquet", "unpacked", "--no-progress"],
        ["data", "pairs", "bursts", "pairs.parquet", "--no-progress"],
        ["data", "import-pkl", "course.pkl", "course.parquet", "--no-progress"],
        ["assess", "noisy", "--limit", "1", "--strip", "assess.png"],
        ["evaluate", "--data", "clean", "--limit", "1", "--inputs", "8bit", "--strip", "evaluate.png"],
        ["average", "a.n2n", "b.n2n", "--out", "mean.n2n"],
        ["train", "--data", "clean", "--out", "run", "--no-ray", "--smoke-test", "--no-progress"],
        ["denoise", "noisy", "denoised", "--model", "run/model.n2n", "--workers", "1", "--no-progress"],
        ["bench", "core", "--cases", "seed-train", "--repeats", "1", "--warmup", "0"],
        ["sweep", "--data", "clean", "--out", "sweep", "--smoke-test", "--cpus-per-trial", "1",
         "--max-concurrent", "1", "--address", "local"],
        ["demo", "--out", "demo", "--photo", "astronaut", "--max-side", "32", "--train-steps", "0"],
        ["export", "run/model.n2n", "exported", "--format", "torch"],
    ]
    for call in calls:
        result = _n2n(fresh_install, *call, cwd=tmp_path)
        assert result.returncode == 0, (call, result.stdout[-2000:] + result.stderr[-4000:])
        assert "Traceback" not in result.stderr, (call, result.stderr[-4000:])
    assert (tmp_path / "run" / "model.n2n").is_file() and (tmp_path / "mean.n2n").is_file()
    assert (tmp_path / "denoised" / "img0.png").is_file() and (tmp_path / "demo" / "report.png").is_file()
    assert sorted(os.listdir(tmp_path / "exported")) == ["n2n_model.py", "n2n_model.safetensors"]
    # ONNX needs the export extra, which README's install leaves out: one line saying so
    result = _n2n(fresh_install, "export", "default", "model.onnx", cwd=tmp_path)
    assert result.returncode == 2 and "pip install 'n2n[export]'" in result.stderr, result.stderr
    assert not (tmp_path / "model.onnx").exists()
    # the Python API is installed too (the top-level package `n2n`)
    api = subprocess.run([str(fresh_install / "python"), "-c",
                          "import numpy as np; from n2n import Denoiser; "
                          "print(Denoiser.load('default').denoise(np.zeros((20, 20), np.uint8)).shape)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert api.returncode == 0 and api.stdout.strip() == "(20, 20)", api.stderr[-2000:]
