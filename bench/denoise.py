"""Bulk denoising benchmark: the whole job against the model alone, a plain loop, and memory.

    PYTHONPATH=. python bench/denoise.py --images 20 --size 512 --width 16
    PYTHONPATH=. python bench/denoise.py --default-model --images 4 --threads 1   # the shipped model

On a folder of `--images` N generated size x size PNGs, in one run:
  1. model alone: `model(x)` (eval mode, one image at a time, all cores) on the images
     already decoded in memory -> megapixels/s, the ceiling for the job; measured before
     and again after the jobs (the machine's load drifts), ratios taken to their mean;
  2. plain sequential loop over the files in this process: read, decode, denoise_image,
     encode, write -> megapixels/s;
  3. the job (`n2n denoise`, a subprocess with its own local Ray) on N and on 10N images:
     megapixels/s end to end (Ray start, actor start and model load included) and in
     steady state (first to last manifest line; only when the results reached the
     driver at 3 or more distinct times: Ray Data can hand a short job's batches over
     in one burst at the end, which leaves no span to divide by), and the peak memory
     of the whole process tree (driver, Ray processes, actors; sum of PSS sampled every
     0.2 s, Linux), also split into the first and second half of each run's wall time
     (memory that grows with the images processed shows as a higher second half).
Targets: job >= 80% of the model's rate; peak memory flat from N to 10N.
The load average (/proc/loadavg) is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from n2n_core import build_model, load_checkpoint, save_checkpoint
from pipeline.assets import default_model_path
from pipeline.data.images import decode_image, encode_image
from pipeline.inference import denoise_image

ROOT = Path(__file__).resolve().parents[1]


def make_pngs(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """count size x size RGB PNGs of smooth shapes plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        base = np.stack([np.sin(rng.uniform(2, 12) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 12) * yy)
                         for _ in range(3)], -1)
        array = np.clip(0.5 + 0.35 * base + rng.normal(0, 0.1, base.shape), 0, 1)
        path = folder / f"img{i:05d}.png"
        Image.fromarray((array * 255).round().astype(np.uint8)).save(path, compress_level=1)
        paths.append(path)
    return paths


def tree_pss_bytes(root_pid: int) -> int:
    """Sum of PSS over root_pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def model_alone(model, paths: list[Path]) -> float:
    """Megapixels/s of model(x) on images decoded beforehand."""
    images = [decode_image(p.read_bytes(), p.name).pixels.unsqueeze(0) for p in paths]
    model.eval()
    model(images[0])  # warm-up
    start = time.perf_counter()
    for x in images:
        model(x)
    seconds = time.perf_counter() - start
    return sum(x.shape[2] * x.shape[3] for x in images) / 1e6 / seconds


def sequential_loop(model, paths: list[Path], out: Path, tile: int) -> float:
    """Megapixels/s of read -> decode -> denoise_image -> encode -> write, one file at a time."""
    out.mkdir(parents=True, exist_ok=True)
    pixels = 0
    start = time.perf_counter()
    for p in paths:
        decoded = decode_image(p.read_bytes(), p.name)
        result = denoise_image(model, decoded.pixels, tile=tile, inplace=True)
        (out / p.name).write_bytes(encode_image(decoded, result))
        pixels += result.shape[1] * result.shape[2]
    return pixels / 1e6 / (time.perf_counter() - start)


def run_job(source: Path, out: Path, checkpoint: Path, args) -> dict:
    """Run `n2n denoise` in a subprocess; rates and peak tree memory."""
    command = [sys.executable, "-m", "pipeline.cli", "denoise", str(source), str(out), "--model", str(checkpoint),
               "--tile", str(args.tile), "--batch-size", str(args.batch_size), "--no-progress", "--address", "local"]
    if args.workers:
        command += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds since start, PSS bytes)

    def sample():
        while process.poll() is None:
            samples.append((time.perf_counter() - start, tree_pss_bytes(process.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"job failed ({process.returncode}):\n{stdout}\n{stderr[-3000:]}")
    first = [b for t, b in samples if t < wall / 2] or [0]
    second = [b for t, b in samples if t >= wall / 2] or [0]
    records = [json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()]
    megapixels = sum(r["megapixels"] for r in records)
    arrivals = sorted({r["time"] for r in records})  # one manifest append per batch received
    steady_mp = megapixels - sum(r["megapixels"] for r in records if r["time"] == arrivals[0])
    steady = steady_mp / (arrivals[-1] - arrivals[0]) if len(arrivals) >= 3 else float("nan")
    return {"images": len(records), "megapixels": megapixels, "wall_s": wall,
            "end_to_end_mp_s": megapixels / wall, "steady_mp_s": steady, "arrivals": len(arrivals),
            "peak_mib": max(first + second) / 2**20, "peak_halves_mib": (max(first) / 2**20, max(second) / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20, help="N; the second job runs 10N")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--depth", type=int, default=5, help="U-Net depth")
    parser.add_argument("--width", type=int, default=16, help="U-Net width (48 in the paper)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--default-model", action="store_true",
                        help="the shipped default model (pipeline/assets/default.n2n) instead of a random "
                             "U-Net of --depth and --width")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.default_model:
        model = load_checkpoint(default_model_path()).model
        description = f"the default model ({model.config.kwargs})"
    else:
        model = build_model("unet", depth=args.depth, width=args.width, generator=torch.Generator().manual_seed(0))
        description = f"unet depth {args.depth} width {args.width}"
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "model.n2n"
        save_checkpoint(checkpoint, model)
        small = make_pngs(tmp / "small", args.images, args.size)
        large_dir = tmp / "large"
        make_pngs(large_dir, 10 * args.images, args.size, seed=1)
        alone = model_alone(model, small)
        loop = sequential_loop(model, small, tmp / "loop_out", args.tile)
        job_n = run_job(tmp / "small", tmp / "out_n", checkpoint, args)
        job_10n = run_job(large_dir, tmp / "out_10n", checkpoint, args)
        alone_after = model_alone(model, small)
    alone_before, alone = alone, (alone + alone_after) / 2
    print(f"# n2n bench denoise: {args.images} and {10 * args.images} PNGs of {args.size}x{args.size}, "
          f"{description}, {os.cpu_count()} CPUs, torch threads {args.threads}")
    print(f"load average (1, 5, 15 min): {load_start} at the start, {load_average()} at the end")
    print(f"model alone (in memory)      {alone:8.3f} MP/s  (before the jobs {alone_before:.3f}, "
          f"after {alone_after:.3f})")
    print(f"sequential loop over files   {loop:8.3f} MP/s  ({loop / alone:.0%} of the model)")
    for name, job in (("job N", job_n), ("job 10N", job_10n)):
        print(f"{name:8s} {job['images']:5d} images   end to end {job['end_to_end_mp_s']:7.3f} MP/s "
              f"({job['end_to_end_mp_s'] / alone:.0%}), steady {job['steady_mp_s']:7.3f} MP/s "
              f"({job['steady_mp_s'] / alone:.0%}, {job['arrivals']} arrivals), wall {job['wall_s']:.1f} s, "
              f"peak memory {job['peak_mib']:.0f} MiB (first / second half {job['peak_halves_mib'][0]:.0f} / "
              f"{job['peak_halves_mib'][1]:.0f})")
    print(f"peak memory 10N / N: {job_10n['peak_mib'] / job_n['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
