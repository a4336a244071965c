"""The checks of bench/gpu_check.sh that are not tests or other benches: gradients and tiles.

    PYTHONPATH=. python bench/gpu_check.py float64 --device cuda          # the default U-Net, batch 16 of 64x64
    PYTHONPATH=. python bench/gpu_check.py tiles --device cuda            # a 6000x8000 image at tiles 512/1024/2048

`float64`: the default model's U-Net (depth 4, width 44, residual; the built-in weights)
in float64 on the device against its torch.nn twin under torch autograd: forward, the
input gradient and every parameter gradient of one backward pass, for each convolution
path (`taps`, `gemm`). It prints the largest error of each, relative to the largest
value of its tensor, and fails above 1e-9.

`tiles`: `denoise_image` with the built-in default model on one smooth image of `--size`,
at each of `--tiles` (32 pixels of context), in float32 and, on CUDA, bfloat16, with the
forwards sized as the bulk job's actor sizes them (`memory.forward_budget`,
`memory.ForwardCost`): time, megapixels/s, forwards, and peak memory (CUDA: torch's
allocated memory above its level before; CPU: the resident set's rise, sampled every
millisecond) beside the peak `ForwardCost` predicts for one forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from n2n_core import load_checkpoint
from n2n_core.conv import set_conv_plan
from n2n_core.conv_plan import plan_for
from pipeline.assets import default_model_path

from pipeline.export.torch_twins import torch_twin

try:  # run from the repository root (PYTHONPATH=.) or imported as bench.gpu_check
    from bench.core import peak_memory
except ImportError:  # run as a script: bench/ itself is on sys.path
    from core import peak_memory


def default_model(device, dtype=torch.float32):
    return load_checkpoint(default_model_path(), map_location=device).model.to(device=device, dtype=dtype)


def check_float64(device: str, batch: int, size: int, tolerance: float = 1e-9) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64).to(device)
    grad_out = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64).to(device)
    ok = True
    for path in ("taps", "gemm"):
        model = default_model(device, torch.float64)
        set_conv_plan(model, dataclasses.replace(plan_for(device), path=path)).train()
        twin = torch_twin(model)
        xt = x.clone().requires_grad_(True)
        twin(xt).backward(grad_out)
        model.zero_grad()
        out = model(x)
        grad_x = model.backward(grad_out.clone())
        reference = twin(x.clone())
        pairs = [("output", out, reference.detach()), ("input gradient", grad_x, xt.grad)]
        pairs += [(f"grad {name}", p.grad, dict(twin.named_parameters())[name].grad)
                  for name, p in model.named_parameters()]
        errors = {name: float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) for name, a, b in pairs}
        worst = max(errors, key=errors.get)
        params = len(pairs) - 2
        status = "ok" if errors[worst] <= tolerance else "FAILED"
        ok = ok and status == "ok"
        print(f"{path:<5} batch {tuple(x.shape)} float64 on {device}: output {errors['output']:.1e}, input gradient "
              f"{errors['input gradient']:.1e}, worst of {params} parameter gradients {max(list(errors.values())[2:]):.1e}"
              f" (largest error relative to the tensor's largest value; worst: {worst}) {status}", flush=True)
    return ok


def smooth_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) in [0, 1]: smooth stripes plus a little noise, made in bands (an 8000x6000 image is 0.6 GB)."""
    image = torch.empty(3, height, width)
    xx = torch.arange(width, dtype=torch.float32)[None, :] / width
    g = torch.Generator().manual_seed(0)
    for y0 in range(0, height, 512):
        yy = torch.arange(y0, min(y0 + 512, height), dtype=torch.float32)[:, None] / width
        band = torch.stack([torch.sin(40 * xx + 3 * yy), torch.cos(30 * yy + xx), torch.sin(20 * (xx + yy))])
        image[:, y0:y0 + band.shape[1]] = (0.5 + 0.4 * band + 0.05 * torch.randn(band.shape, generator=g)).clamp(0, 1)
    return image


def peak_during(fn, device: str) -> tuple[float, int]:
    """(seconds, peak bytes above the level before) of one call."""
    if device != "cpu":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    seconds = []

    def timed():
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)

    peak = peak_memory(timed)
    return seconds[0], peak


def check_tiles(device: str, height: int, width: int, tiles: list[int], precisions: list[str]) -> bool:
    from pipeline.inference.memory import ForwardCost, forward_budget
    from pipeline.inference.tiling import PRECISIONS, denoise_image

    image = smooth_image(height, width)
    megapixels = height * width / 1e6
    for precision in precisions:
        model = default_model(device, PRECISIONS[precision]).eval()
        cost = ForwardCost.measure(model)
        budget = forward_budget(device)
        pixels = cost.pixels(budget)
        print(f"{precision} on {device}: a forward needs {cost.fixed / 2**20:.0f} MiB + {cost.per_pixel:.0f} bytes per "
              f"padded pixel; budget {budget / 2**30:.1f} GiB: {pixels / 1e6:.1f} MP per forward", flush=True)
        denoise_image(model, image[:, :256, :256], tile=128, forward_pixels=pixels)  # warm-up
        for tile in tiles:
            calls = []
            real = model.forward
            model.forward = lambda x: calls.append(x.shape[0] * x.shape[2] * x.shape[3]) or real(x)
            try:
                seconds, peak = peak_during(lambda: denoise_image(model, image, tile=tile, forward_pixels=pixels), device)
            finally:
                del model.forward
            region = max(calls) if calls else 0
            print(f"  tile {tile:>5}: {seconds:7.2f} s, {megapixels / seconds:7.2f} MP/s, {len(calls)} forwards of up to "
                  f"{region / 1e6:.1f} MP, peak {peak / 2**20:,.0f} MiB (predicted for the largest forward: "
                  f"{cost.bytes(region) / 2**20:,.0f} MiB)", flush=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("float64", "tiles"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16, help="float64: the batch")
    parser.add_argument("--size", default=None, help="float64: the side (default 64); tiles: HxW (default 6000x8000)")
    parser.add_argument("--tiles", default="512,1024,2048")
    parser.add_argument("--precisions", default=None, help="tiles: float32,bfloat16 (default: both on CUDA, "
                                                          "float32 on the CPU)")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False here")
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device != "cpu" else "CPU"
    print(f"torch {torch.__version__}, {where}")
    if args.check == "float64":
        return 0 if check_float64(args.device, args.batch, int(args.size or 64)) else 1
    height, width = (int(v) for v in (args.size or "6000x8000").split("x"))
    precisions = (args.precisions or ("float32" if args.device == "cpu" else "float32,bfloat16")).split(",")
    tiles = [int(t) for t in args.tiles.split(",")]
    return 0 if check_tiles(args.device, height, width, tiles, precisions) else 1


if __name__ == "__main__":
    sys.exit(main())
