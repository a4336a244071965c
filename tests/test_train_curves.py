"""The training picture: curves and a few validation rows, however many images were validated."""
import json

import torch
from PIL import Image

from pipeline.training.curves import MAX_STRIP_ROWS, plot_run


def _height_for(tmp_path, rows: int) -> int:
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"config": {}}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 5)] + [{"step": 4, "psnr": 30.0,
                                                                                          "psnr_noisy": 20.0}]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    image = torch.rand(3, 16, 16)
    png = tmp_path / f"plot-{rows}.png"
    plot_run(metrics, png, [(image, image, image)] * rows)
    return Image.open(png).size[1]


def test_the_strip_draws_at_most_a_few_validation_images(tmp_path):
    one, few, many = (_height_for(tmp_path, n) for n in (1, MAX_STRIP_ROWS, 40))
    assert one < few == many  # 40 validation images draw as many rows as MAX_STRIP_ROWS
