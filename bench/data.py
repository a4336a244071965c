"""Benchmark: training-batch throughput per core, from a folder and from Parquet, against
what one core's U-Net training step consumes.

    python bench/data.py                       # makes its own test images in a temp dir
    python bench/data.py --data PHOTOS_FOLDER  # real photos (also packed to a temp Parquet)
    python bench/data.py --data photos.parquet --json

Everything runs on one thread (`torch.set_num_threads(1)`), so the figures are per core.
For each source, three rates of `TrainingBatches.batch` (patches per second):
- cold:     a fresh cache; each image is read and decoded on first use;
- warm:     the cache holds the images (the steady state when they fit in the cache);
- uncached: cache of one image: every patch reads and decodes its image (the worst case,
            a dataset much larger than the cache).
The consumer is the torch.nn twin of the `unet` architecture (pipeline/export/torch_twins.py: Noise2Noise
paper layout, 3x3 convolutions, width 48, five 2x2 max-pool levels, nearest upsampling
with concatenation, leaky ReLU 0.1): one forward + MSE + backward + Adam step on a
(batch, 3, crop, crop) batch, the fastest a core can train it. Its rate is
batch / step time; the data side must be >= 5x that rate (`--min-ratio`).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from pipeline.data.datasets import open_dataset
from pipeline.data.writers import ParquetWriter
from pipeline.data.noise import parse_noise
from pipeline.data.patches import TrainingBatches
from pipeline.export.torch_twins import build_torch_model


# ----------------------------------------------------------------------------- consumer
def unet_step_seconds(batch: int, crop: int, steps: int) -> float:
    """Median seconds of one U-Net training step (forward, MSE, backward, Adam) on one thread."""
    torch.manual_seed(0)
    model = build_torch_model("unet")  # torch.nn twin of n2n_core's unet (depth 5, width 48)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 3, crop, crop), torch.rand(batch, 3, crop, crop)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- producer
def make_images(root: pathlib.Path, count: int, size: int, seed: int = 0) -> None:
    """Photo-like test images: smooth random fields plus fine texture; PNG and JPEG, RGB and grey."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.random((size // 16, size // 16, 3))
        img = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                         dtype=np.float64)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(img)
        if i % 4 == 3:
            im = im.convert("L")
        sub = root / f"set{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 2:
            im.save(sub / f"{i:04d}.jpg", quality=90)
        else:
            im.save(sub / f"{i:04d}.png")


def pack(folder, out) -> None:
    ds = open_dataset(folder)
    with ParquetWriter(out) as w:
        for key, data in ds.records():
            w.write(key, data)


def rate(batches: TrainingBatches, first_step: int, count: int) -> float:
    t = time.perf_counter()
    for step in range(first_step, first_step + count):
        batches.batch(step)
    return batches.batch_size * count / (time.perf_counter() - t)


def measure(path, args) -> dict:
    ds = open_dataset(path)
    noise = parse_noise(args.noise)
    kw = dict(crop_size=args.crop, batch_size=args.batch_size, seed=0)
    tb = TrainingBatches(ds, noise, **kw)
    cold = rate(tb, 0, args.batches)
    for step in range(args.batches, args.batches + max(1, len(ds) // args.batch_size)):
        tb.batch(step)  # touch the rest of the images so the warm pass is steady state
    warm = rate(tb, 10_000, args.batches)
    uncached = rate(TrainingBatches(open_dataset(path), noise, cache_bytes=0, **kw), 20_000, args.batches)
    return {"images": len(ds), "cold": cold, "warm": warm, "uncached": uncached, "bad": len(tb.bad)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder or Parquet of images (default: generated test images)")
    p.add_argument("--images", type=int, default=48, help="generated images (without --data)")
    p.add_argument("--image-size", type=int, default=320, help="side of generated images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--noise", default="gaussian:25")
    p.add_argument("--batches", type=int, default=20, help="batches per timed pass")
    p.add_argument("--unet-steps", type=int, default=5, help="timed U-Net steps (median)")
    p.add_argument("--skip-unet", action="store_true", help="only measure the data side")
    p.add_argument("--min-ratio", type=float, default=5.0, help="exit 1 if data/consumer is below this")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    results = {"config": vars(args), "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads 1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if args.data is None:
            folder = tmp / "images"
            make_images(folder, args.images, args.image_size)
        else:
            folder = pathlib.Path(args.data)
        if open_dataset(folder).kind == "folder":
            results["folder"] = measure(folder, args)
            pack(folder, tmp / "images.parquet")
            results["parquet"] = measure(tmp / "images.parquet", args)
        else:
            results["parquet"] = measure(folder, args)
    ok = True
    if not args.skip_unet:
        step = unet_step_seconds(args.batch_size, args.crop, args.unet_steps)
        consumed = args.batch_size / step
        results["unet"] = {"step_seconds": step, "patches_per_second": consumed}
        for source in ("folder", "parquet"):
            if source in results:
                r = results[source]
                r["ratio_warm"] = r["warm"] / consumed
                r["ratio_uncached"] = r["uncached"] / consumed
                ok = ok and r["ratio_uncached"] >= args.min_ratio
    results["ok"] = ok
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"data bench: batches of {args.batch_size} crops {args.crop}x{args.crop}, noise {args.noise}, "
              f"{results['machine']}")
        for source in ("folder", "parquet"):
            if source in results:
                r = results[source]
                line = (f"  {source:8s} {r['images']} images: cold {r['cold']:8.0f}  warm {r['warm']:8.0f}  "
                        f"uncached {r['uncached']:8.0f} patches/s/core")
                if "ratio_warm" in r:
                    line += f"  (x{r['ratio_warm']:.0f} warm, x{r['ratio_uncached']:.0f} uncached)"
                print(line)
        if "unet" in results:
            u = results["unet"]
            print(f"  unet step (torch.nn, 1 thread): {u['step_seconds'] * 1000:.0f} ms "
                  f"= {u['patches_per_second']:.1f} patches/s/core consumed")
            print(f"  {'OK' if ok else 'TOO SLOW'}: data >= {args.min_ratio:g}x consumption (uncached worst case)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
