"""bench/gpu_check.sh, the one script that checks a GPU machine, runs on the CPU too (`--device cpu`, every size
cut down): CI runs it here, so the script a GPU machine gets is known to work up to its device."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = [
    "1. CUDA tests",
    "1. tests named cuda",
    "2. float64 U-Net against torch autograd",
    "3. bench/core.py --conv-path taps",
    "3. bench/core.py --conv-path gemm",
    "4. kernel launches per step and per tile",
    "5. denoise_image on a large image at three tiles",
    "6. Ray training, one cpu actor",
]


def run_script(*args, timeout=900):
    # one thread: the benches' many small operations would spin-wait on a busy machine's second core
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu():
    """90 s on a quiet 2-core machine (7 minutes under heavy load): every step runs (pytest and Ray are installed here) and passes, and the summary
    lists each one as ok."""
    proc = run_script("--device", "cpu")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    summary = output[output.index("== summary (--device cpu"):]
    for step in STEPS:
        assert f"\n== {step}\n" in output, f"step {step!r} did not run:\n{output[-4000:]}"
        assert re.search(rf"^{re.escape(step)}\s+\d+s\s+ok$", summary, re.M), f"{step!r} not ok:\n{summary}"
    assert "FAILED" not in summary and "skipped" not in summary, summary
    # what each step is there to show
    assert re.search(r"taps .*float64 on cpu: .* ok\ngemm .*float64 on cpu: .* ok", output), output[-4000:]
    assert re.search(r"taps +per step: +\d+ kernels.*\ngemm +per step: +\d+ kernels", output), output[-4000:]
    assert len(re.findall(r"tile +\d+: .* MP/s, \d+ forwards .* peak [\d,]+ MiB", output)) == 3, output[-4000:]
    assert "trained 2 steps on 1 workers" in output, output[-4000:]


def test_the_gpu_check_refuses_an_unknown_device():
    proc = run_script("--device", "tpu", timeout=60)
    assert proc.returncode == 2 and "--device must be cuda or cpu, got tpu" in proc.stderr, proc.stderr
    proc = run_script("--device", timeout=60)
    assert proc.returncode == 2 and "--device needs a value (cuda or cpu)" in proc.stderr, proc.stderr
    proc = run_script("--frobnicate", timeout=60)
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_check_without_cuda_says_to_use_the_cpu():
    proc = run_script(timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "torch.cuda.is_available() is False here; use --device cpu" in proc.stderr, proc.stderr
    assert "== 1." not in proc.stdout  # nothing ran


def test_the_gpu_check_help_lists_its_steps():
    proc = run_script("--help", timeout=60)
    assert proc.returncode == 0
    for number in range(1, 7):
        assert f"#   {number}. " in proc.stdout, proc.stdout
