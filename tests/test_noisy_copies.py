"""`n2n data noisy`: 8-bit noisy copies that are exactly the evaluation inputs."""
import numpy as np
import torch
from PIL import Image


def test_noisy_copies_are_the_evaluation_inputs_and_never_overwrite(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.quality.evaluate import add_evaluation_noise
    from pipeline.data.images import decode_image

    clean = tmp_path / "clean"
    (clean / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name in ("a.jpg", "sub/b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(clean / name)
    (clean / "d.png").write_bytes(b"not an image")
    out = tmp_path / "noisy"
    runner = CliRunner()
    result = runner.invoke(main, ["data", "noisy", str(clean), str(out), "--noise", "camera,jpeg=70-90",
                                  "--seed", "4", "--no-progress"])
    assert result.exit_code == 1, result.output  # d.png was left out
    assert "wrote 3 noisy copies" in result.output and "left out 1" in result.output and "d.png" in result.output
    keys = sorted(str(p.relative_to(clean)) for p in clean.rglob("*") if p.is_file())
    for index, key in enumerate(keys):
        if key == "d.png":
            continue
        written = decode_image((out / key).with_suffix(".png").read_bytes(), key).pixels
        expected = add_evaluation_noise(decode_image((clean / key).read_bytes(), key).pixels, "camera,jpeg=70-90",
                                        4, index, clip=True)
        assert torch.equal((written * 255).round(), (expected * 255).round()), key
    again = runner.invoke(main, ["data", "noisy", str(clean), str(out), "--no-progress"])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    inside = runner.invoke(main, ["data", "noisy", str(clean), str(clean / "noisy"), "--no-progress"])
    assert inside.exit_code == 2 and "overlap" in inside.output and not (clean / "noisy").exists()
    bad = runner.invoke(main, ["data", "noisy", str(clean), str(tmp_path / "x"), "--noise", "gaussian:inf"])
    assert bad.exit_code == 2 and "gaussian:inf" in bad.output and not (tmp_path / "x").exists()
