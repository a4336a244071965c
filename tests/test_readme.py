"""The README's Python example and docs/core.md's n2n_core example run as printed, and they work."""
import pathlib
import re

import torch

from n2n_core import MSELoss, build_model

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CORE_DOC = README.parent / "docs" / "core.md"


def python_block(path: pathlib.Path, heading: str) -> str:
    """The first python block after `heading` in the Markdown file `path`."""
    text = path.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"{path.name}: no python block under {heading!r}"
    return match.group(1)


def readme_example() -> str:
    """The python block of docs/core.md's section "In ten lines"."""
    return python_block(CORE_DOC, "### In ten lines")


def test_readme_example_runs_and_lowers_the_loss(capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 14, "the example grew beyond a glance"
    ns = {}
    exec(compile(code, str(CORE_DOC), "exec"), ns)
    assert re.fullmatch(r"step 19: loss \d+\.\d{4}\n", capsys.readouterr().out)
    # the trained model beats the same model untrained, on a fresh noisy pair of the same images
    clean, trained = ns["clean"], ns["model"]
    untrained = build_model("unet", depth=2, width=8, generator=torch.Generator().manual_seed(0))
    noisy_input, noisy_target = clean + 0.1 * torch.randn_like(clean), clean + 0.1 * torch.randn_like(clean)
    before = MSELoss()(untrained(noisy_input), noisy_target).item()
    after = MSELoss()(trained(noisy_input), noisy_target).item()
    assert after < 0.5 * before, (before, after)


def readme_api_example() -> str:
    """The python block of the README section "From Python"."""
    return python_block(README, "## From Python")


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(readme_api_example(), str(README), "exec"), ns)
    noisy, clean, softer = ns["noisy"], ns["clean"], ns["softer"]
    assert clean.shape == noisy.shape == (96, 96, 3) and clean.dtype == np.uint8
    assert isinstance(softer, Image.Image) and softer.size == (96, 96) and softer.mode == "RGB"
    truth = ns["astronaut"]()[:96, 176:272].astype(float)
    # the denoised image is far closer to the clean photo than the noisy one
    assert np.abs(clean - truth).mean() < 0.5 * np.abs(noisy - truth).mean()
    assert capsys.readouterr().out.splitlines()[-1] == "1 inputs: 1 done, 0 skipped, 0 failed"
    # the bulk job wrote the same pixels as .denoise (no tiling at this size)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "denoised" / "astronaut.png")), clean)
