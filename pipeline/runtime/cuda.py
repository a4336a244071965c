"""Is CUDA usable in this process? The check of GPU actors and of a GPU node's setup.

`cuda_problem()` is None when torch sees a GPU and can run a kernel on it, else the
reason in one line. `python -m pipeline.runtime.cuda` is the check cluster.yaml's worker setup
runs: it prints the GPUs and exits 0, or prints the reason and exits 1 (the node's setup
fails, instead of the node joining the cluster to offer GPUs that nothing can use).

A GPU actor (Ray gave it a GPU) whose CUDA is not usable is an error, never a quiet
fallback to the CPU. `N2N_LOGICAL_GPUS=1` in a worker's environment is the one exception,
for tests of GPU placement on a machine without a GPU (a Ray started with `num_gpus=N`
logical GPUs): such an actor then computes on the CPU.
"""
from __future__ import annotations

import os
import sys

LOGICAL_GPUS_ENV = "N2N_LOGICAL_GPUS"


def logical_gpus_allowed() -> bool:
    """True when N2N_LOGICAL_GPUS=1: GPU actors may compute on the CPU (tests without a GPU)."""
    return os.environ.get(LOGICAL_GPUS_ENV) == "1"


def cuda_problem() -> str | None:
    """None when CUDA works in this process (a small kernel ran on cuda:0), else why not."""
    import torch

    built = torch.version.cuda
    if not built:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {built}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; is the NVIDIA driver loaded?)")
    if torch.cuda.device_count() < 1:
        return "torch sees no CUDA device"
    try:
        x = torch.arange(4.0, device="cuda:0")
        if float((x * 2).sum().item()) != 12.0:
            return "a test kernel on cuda:0 returned a wrong result"
    except Exception as error:  # driver/runtime mismatch, a GPU in a bad state...
        return f"a test kernel on cuda:0 failed: {type(error).__name__}: {error}"
    return None


def describe_gpus() -> str:
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"{len(names)} GPU{'s' if len(names) != 1 else ''} ({', '.join(names)}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def main() -> int:
    problem = cuda_problem()
    if problem is not None:
        print(f"n2n: CUDA is not usable on this node: {problem}", file=sys.stderr)
        return 1
    print(f"n2n: CUDA usable: {describe_gpus()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
