"""Which convolution path runs on which device: `ConvPlan`, and `plan_for(device)`.

On the CPU, stride-1 "same" convolutions (the U-Net's 3x3 layers) run as kh*kw shifted GEMMs
over the flat padded image in cache-sized blocks, no im2col, or for a thin input (fewer than
`_MIN_GEMM_CHANNELS` channels: an image's 3) as one GEMM per block over that block's columns
(tap_conv.py); other convolutions, and every convolution on CUDA, as im2col (a strided view
plus one copy) and one GEMM (gemm_conv.py); nearest x2
upsampling then a 3x3 convolution as four 2x2 convolutions at low resolution on both
(upsample_conv.py, resample.py). The rule and its reasons are below the class. Every
"measured" or "faster" remark in these modules comes from `python bench/core.py` (or a direct
A/B in its setup) on a CPU; the figures, the machine and what each of these choices bought
are in BENCHMARKS.md, section "Core: from-scratch vs torch.nn".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A GEMM operand with fewer channels than this is thin: the U-Net's 3-channel input and
# output layers. The taps, the GEMM orientation and the im2col fallback all switch on it.
_MIN_GEMM_CHANNELS = 16
_VECTOR_WIDTH = 16  # GEMM widths are rounded up to a multiple of it (`_gemm_width`)


@dataclass(frozen=True)
class ConvPlan:
    """How convolutions run on one kind of device; `plan_for(device)` picks one.

    Attributes:
        path: "taps": a `use_taps` convolution (stride 1, "same" padding, a kernel over 1x1) runs
            as kh*kw shifted GEMMs (block columns for a thin input), the others as im2col and
            one GEMM; "gemm": every convolution as im2col and one GEMM.
        tap_block_rows: anchors per block of the shifted GEMMs (None: one block, the whole length).
        band_elements: columns built at a time when they need not be kept (inference, input gradients).
        round_widths: GEMM widths of the taps rounded up to a multiple of `_VECTOR_WIDTH`.
        slab_elements: in-place elementwise backward passes (LeakyReLU) in slabs of this many
            elements (None: the whole tensor at once).
    """

    path: str
    tap_block_rows: int | None
    band_elements: int
    round_widths: bool
    slab_elements: int | None

    def __post_init__(self):
        if self.path not in ("taps", "gemm"):
            raise ValueError(f"ConvPlan.path must be 'taps' or 'gemm', got {self.path!r}")


# The rule, and why (the figures: BENCHMARKS.md, "Core: from-scratch vs torch.nn" and "Core on CUDA"):
# - CPU: the taps. On a few cores the time goes to the GEMMs and to memory traffic: im2col
#   writes and reads 9x the input (25% of a training step when it was used), while the kh*kw
#   GEMMs read the padded input in place. Blocks of 4096 anchors keep each tap's rows and the
#   output block in cache across the GEMMs, and the activation runs on each block there (in
#   the default U-Net's step the same time as whole-length GEMMs: tap_conv._shifted_gemms),
#   and a GEMM call costs the host about 4 us (timed on tiny inputs), about 3% of a U-Net
#   training step at batch 16 of 64x64 for its ~2,100 (counted by torch's profiler). A thin
#   input (3 channels) would make those GEMMs of inner size 3: each block copies its windows
#   into columns in cache instead (as im2col, one block at a time: measured 0.68x
#   the time of whole-image im2col for a 512x512 image, and its output lands in the padded
#   buffer the next layer reads). Sums over rows (weight gradients) are split into one part
#   per thread (row_split.py): the GEMM library leaves them on one thread. Widths are rounded
#   up to 16 (AVX-512 registers hold 16 floats: the 99-channel input gradient as 112 takes 19%
#   less time) and elementwise backward passes run in cache-sized slabs.
# - CUDA: one GEMM per convolution. Every GEMM is a kernel launch costing the host 5-10 us,
#   and a block of 4096 anchors by 48 channels is a few microseconds of an H100's work: the
#   taps in blocks would make ~565 launches per full-resolution convolution of a training step
#   at batch 16 of 64x64 (~3,600 a step, ~4,600 per 576x576 inference tile; counted by
#   bench/launches.py), so the host's launch loop would set the pace. im2col and one GEMM of
#   inner size kh*kw*C is 2 launches and a GEMM large enough to fill the GPU; the columns' 9x
#   the input is memory a GPU has, and inference builds them in bands of 2^28 elements (1 GiB
#   in float32). cuBLAS needs no width rounding and the GPU no cache-sized slabs. Unmeasured
#   on a GPU so far: the only CUDA figures (im2col, H200) are 2.3x cuDNN per U-Net step;
#   bench/gpu_check.sh times both paths (`bench/core.py --conv-path taps|gemm`) where one is at hand.
CPU_PLAN = ConvPlan(path="taps", tap_block_rows=4096, band_elements=1 << 24, round_widths=True,
                    slab_elements=1 << 18)
CUDA_PLAN = ConvPlan(path="gemm", tap_block_rows=None, band_elements=1 << 28, round_widths=False,
                     slab_elements=None)


def plan_for(device) -> ConvPlan:
    """The `ConvPlan` of a device: `CUDA_PLAN` on CUDA, `CPU_PLAN` anywhere else."""
    return CUDA_PLAN if torch.device(device).type == "cuda" else CPU_PLAN
