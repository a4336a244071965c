"""The denoising actor with its stages and batches against one image at a time, side by side.

    PYTHONPATH=. python bench/batching.py                         # the default model's size, both sets
    PYTHONPATH=. python bench/batching.py --sets small --rounds 5

In one process, on folders of generated PNGs (`small`: same-sized photos of 481x321, as
BSDS/CBSD68 hold; `large`: photos of 2000x1500, tiled at `--tile`), three contestants
denoise every file of a set into a folder of their own, interleaved round by round with
the order rotating, so background load hits all alike:
- `loop`: read, decode, `denoise_image`, encode, write, one file after the other on one
  thread, one image or tile per forward: what the actor did before it batched;
- `stages`: the actor (`DenoiseWorker`, in this process, the whole set as one call) with
  decoding ahead and encoding behind the model on their own threads, one image or tile
  per forward (`forward_bytes=0`);
- `batched`: the same actor with its forwards sized from the device's budget
  (`memory.py`: several images or tiles per forward).
Rates are megapixels of input per second, the median over the rounds after a warm-up
round; the ratios are the medians of the per-round ratios. The outputs of all three are
compared byte for byte.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from n2n_core import build_model, save_checkpoint
from pipeline.data.datasets import open_dataset
from pipeline.data.images import decode_image, encode_image
from pipeline.inference.outputs import create_staging
from pipeline.inference.tiling import denoise_image
from pipeline.inference.worker import DenoiseWorker, WorkerPlan, table_entries

SETS = {"small": (24, 321, 481), "large": (2, 1500, 2000)}  # images, height, width


def make_photos(folder: Path, count: int, height: int, width: int, seed: int = 0) -> None:
    """Smooth random shapes plus noise, as PNGs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    for i in range(count):
        base = np.stack([np.sin(rng.uniform(2, 12) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 12) * yy)
                         for _ in range(3)], -1)
        array = np.clip(0.5 + 0.35 * base + rng.normal(0, 0.1, base.shape), 0, 1)
        Image.fromarray((array * 255).round().astype(np.uint8)).save(folder / f"img{i:03d}.png", compress_level=1)


def loop(model, source: Path, out: Path, tile: int) -> None:
    for path in sorted(source.iterdir()):
        decoded = decode_image(path.read_bytes(), path.name)
        result = denoise_image(model, decoded.pixels, tile=tile, inplace=True)
        (out / path.name).write_bytes(encode_image(decoded, result))


def actor(checkpoint: Path, source: Path, out: Path, tile: int, forward_bytes: int | None, threads: int):
    """A zero-argument callable: the actor over the whole set, as one call."""
    dataset = open_dataset(source)
    batch = pa.table({"index": list(range(len(dataset))), "key": dataset.keys})
    state = {"round": 0}

    def run() -> None:
        state["round"] += 1
        run_id = f"round-{state['round']}"
        create_staging(out, run_id)
        plan = WorkerPlan(model_path=str(checkpoint), device="cpu", threads=threads, tile=tile, overlap=32,
                          max_pixels=10**9, input_kind="folder", output_kind="folder", output_root=str(out),
                          run=run_id, forward_bytes=forward_bytes)
        worker = DenoiseWorker(plan, dataset)  # model loaded and sized outside the timing below
        run.worker = worker

    def call() -> None:
        entries = table_entries(run.worker(batch))
        assert all(e.status == "done" for e in entries), [e.reason for e in entries if e.status != "done"]

    return run, call


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="small,large", help="small, large or both")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--arch", default="depth=4,width=44,residual=true", help="U-Net arguments (random weights)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    arch = {k: (v == "true") if v in ("true", "false") else int(v)
            for k, v in (item.split("=") for item in args.arch.split(","))}
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, unet {arch}, tile {args.tile}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    model = build_model("unet", generator=torch.Generator().manual_seed(0), **arch)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = folder / "model.n2n"
        save_checkpoint(checkpoint, model)
        for name in args.sets.split(","):
            count, height, width = SETS[name]
            source = folder / name
            make_photos(source, count, height, width)
            megapixels = count * height * width / 1e6
            outs = {c: folder / f"{name}-{c}" for c in ("loop", "stages", "batched")}
            prepare, calls = {}, {}
            for contestant, forward_bytes in (("stages", 0), ("batched", None)):
                outs[contestant].mkdir()
                prepare[contestant], calls[contestant] = actor(checkpoint, source, outs[contestant], args.tile,
                                                               forward_bytes, args.threads)
            outs["loop"].mkdir()
            prepare["loop"] = lambda: None
            calls["loop"] = lambda: loop(model, source, outs["loop"], args.tile)
            names = list(calls)
            times = {c: [] for c in names}
            for r in range(args.rounds + 1):
                order = names[r % len(names):] + names[:r % len(names)]
                for contestant in order:
                    prepare[contestant]()
                    torch.set_num_threads(args.threads)
                    start = time.perf_counter()
                    calls[contestant]()
                    if r:
                        times[contestant].append(time.perf_counter() - start)
            for path in sorted(source.iterdir()):
                reference = (outs["loop"] / path.name).read_bytes()
                for contestant in ("stages", "batched"):
                    assert (outs[contestant] / path.name).read_bytes() == reference, (contestant, path.name)
            rates = {c: megapixels / statistics.median(t) for c, t in times.items()}
            ratio = {c: statistics.median(a / b for a, b in zip(times["loop"], times[c])) for c in ("stages", "batched")}
            results[name] = dict(rates=rates, ratio=ratio)
            print(f"{name:<5} {count} x {width}x{height}: loop {rates['loop']:.3f} MP/s, stages {rates['stages']:.3f} "
                  f"({ratio['stages']:.2f}x), batched {rates['batched']:.3f} MP/s ({ratio['batched']:.2f}x the loop); "
                  f"outputs identical", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return results


if __name__ == "__main__":
    main()
