"""Inference cost of two U-Net widths side by side: multiply-adds per pixel and CPU time.

    PYTHONPATH=. python bench/model_size.py --widths 32,44 --size 512 --repeats 15

For each width: the parameters, the convolutions' multiply-adds per input pixel (counted
from the layers' shapes during one forward pass, so it follows the architecture as built),
and the time of `denoise_image` on one size x size RGB image (random weights: the speed
does not depend on them). The widths run alternately, after one warm-up pass each, and the
ratio is the median of the per-round ratios, so drift in the machine's load cancels.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from n2n_core import build_model
from n2n_core.conv import Conv2d
from pipeline.inference import denoise_image


def multiply_adds_per_pixel(model, size: int) -> float:
    """Multiply-adds of all convolutions for one (1, 3, size, size) input, divided by size**2."""
    total = 0
    original = Conv2d.forward

    def counting(self, x, *args, **kwargs):
        nonlocal total
        y = original(self, x, *args, **kwargs)
        kh, kw = self.kernel_size
        total += y.shape[0] * y.shape[2] * y.shape[3] * self.out_channels * self.in_channels * kh * kw
        return y

    Conv2d.forward = counting
    try:
        denoise_image(model, torch.rand(3, size, size))
    finally:
        Conv2d.forward = original
    return total / size ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,44", help="Two or more U-Net widths, comma-separated.")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="Side of the square test image.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed rounds (each runs every width once).")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    models = {w: build_model("unet", depth=args.depth, width=w, residual=True) for w in widths}
    image = torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0))  # (3, H, W)

    for model in models.values():  # warm-up
        denoise_image(model, image)
    times = {w: [] for w in widths}
    for _ in range(args.repeats):
        for w, model in models.items():
            start = time.perf_counter()
            denoise_image(model, image)
            times[w].append(time.perf_counter() - start)

    base = widths[0]
    print(f"U-Net depth {args.depth}, one {args.size}x{args.size} RGB image, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} rounds")
    print("| width | parameters | multiply-adds per pixel | median time (s) | time / width "
          f"{base} (median of rounds) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    macs = {w: multiply_adds_per_pixel(m, min(args.size, 128)) for w, m in models.items()}
    for w, model in models.items():
        ratio = statistics.median(t / b for t, b in zip(times[w], times[base]))
        print(f"| {w} | {model.num_parameters():,} | {macs[w] / 1e3:.1f}k ({macs[w] / macs[base]:.2f}x) | "
              f"{statistics.median(times[w]):.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
