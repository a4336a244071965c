"""The quiet console: a run that works prints n2n's own lines and progress bars only; Ray's
logs go to the run's log (its path printed once), --verbose shows them live."""
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pipeline.runtime.console
from pipeline.runtime.console import quiet_console, ray_started
from train_support import make_images

BAR = re.compile(r"^denoise: +\d+%\|[^|]*\| \d/3 \[[^\]]*\]$")
RAY_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR)|\[\d{4}-\d\d-\d\d .* [EWI] \d+ \d+\])")


def _denoise(tmp_path, *options):
    make_images(tmp_path / "in", count=3, size=40)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "N2N_DEBUG")}
    env["N2N_LOG_DIR"] = str(tmp_path / "logs")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "denoise", str(tmp_path / "in"), str(tmp_path / "out"),
                          "--workers", "1", *options], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", run.stderr) if line.strip()]
    return run.stdout.splitlines(), lines, sorted((tmp_path / "logs").glob("denoise-*.log"))


def test_denoise_prints_only_n2ns_lines(tmp_path):
    stdout, stderr, logs = _denoise(tmp_path)
    out = tmp_path / "out"
    assert stdout[0] == "3 inputs: 3 done, 0 skipped, 0 failed"
    assert re.fullmatch(r"0\.0 MP in \d+\.\d s: \d+\.\d\d MP/s, \d+\.\d\d images/s", stdout[1]), stdout[1]
    assert stdout[2:] == [f"output: {out}  manifest: {out / '_manifest.jsonl'}"]
    assert len(logs) == 1, logs
    expected = {
        "n2n: started a private Ray in this process (no --address and no RAY_ADDRESS): 1 node, N CPUs, 0 GPUs; "
        "pass --address auto to use the Ray cluster running on this node",
        f"n2n: Ray's logs: {logs[0]} (--verbose shows them here)",
        "<progress bar>",
    }
    seen = {"<progress bar>" if BAR.match(line) else re.sub(r"\b\d+ CPUs\b", "N CPUs", line) for line in stderr}
    assert seen == expected, stderr
    log = logs[0].read_text()
    assert "Starting execution of Dataset" in log and "Execution plan of Dataset" in log  # Ray Data's INFO lines
    assert not any(RAY_LOG_LINE.match(line) for line in stderr)


@pytest.mark.slow
def test_verbose_shows_rays_logs_live(tmp_path):
    _, stderr, logs = _denoise(tmp_path, "--verbose")
    assert any("Starting execution of Dataset" in line for line in stderr), stderr
    assert not any(line.startswith("n2n: Ray's logs") for line in stderr) and logs == []


def test_routes_of_the_quiet_console(tmp_path, monkeypatch, capfd):
    """Descriptor 2 into the log, Python's stderr on the console, Ray's Python logs into the log
    (errors also one line on the console), n2n's warnings one line, other warnings in the log."""
    import ray  # noqa: F401  (its console handler is what gets routed)

    monkeypatch.setenv("N2N_LOG_DIR", str(tmp_path))
    own_file = str(Path(pipeline.runtime.console.__file__))
    with quiet_console("check") as session:
        os.write(2, b"a line from C\n")
        print("n2n: a line of n2n", file=sys.stderr)
        logging.getLogger("ray.data.check").warning("Progress bars disabled.")
        logging.getLogger("ray.check").error("a worker died\nwith a long story")
        warnings.warn_explicit("a 16-bit colour file is read at 8 bits", UserWarning, own_file, 1)
        warnings.warn_explicit("deprecated inside a library", FutureWarning, "/somewhere/else.py", 7)
        ray_started()
        ray_started()
        path = session.path
    err = capfd.readouterr().err
    assert err.splitlines() == ["n2n: a line of n2n", "ray: a worker died",
                                "n2n: warning: a 16-bit colour file is read at 8 bits",
                                f"n2n: Ray's logs: {path} (--verbose shows them here)"]
    log = path.read_text()
    for text in ("a line from C", "Progress bars disabled.", "a worker died", "with a long story",
                 "deprecated inside a library"):
        assert text in log
    assert "a line of n2n" not in log
    os.write(2, b"after\n")  # descriptor 2 is the console again
    assert capfd.readouterr().err == "after\n"


def test_an_empty_log_is_removed_and_verbose_changes_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("N2N_LOG_DIR", str(tmp_path))
    with quiet_console("check"):
        print("only n2n", file=sys.stderr)
    with quiet_console("check", verbose=True) as session:
        assert session is None
        os.write(2, b"live\n")
    assert capfd.readouterr().err == "only n2n\nlive\n" and os.listdir(tmp_path) == []


def test_a_log_without_ray_is_named_once_at_the_end(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("N2N_LOG_DIR", str(tmp_path))
    with quiet_console("check") as session:
        os.write(2, b"a C library complains\n")
    assert capfd.readouterr().err == f"n2n: messages of the libraries n2n uses went to {session.path}\n"
    assert session.path.read_text() == "a C library complains\n"
    assert oct(session.path.stat().st_mode & 0o777) == "0o600"


def test_streams_made_during_a_session_still_reach_the_console_after_it(tmp_path):
    """A logging handler or bar made on the console while the session ran (`n2n train`'s
    logging.basicConfig) goes on writing to the console afterwards, never into a file that
    reuses a closed descriptor's number."""
    script = (
        "import logging, os, sys\n"
        "from pipeline.runtime.console import quiet_console\n"
        "with quiet_console('check'):\n"
        "    handler = logging.StreamHandler(sys.stderr)\n"
        "    print('inside', file=sys.stderr)\n"
        "    os.write(2, b'to the log\\n')\n"
        "other = open('other.txt', 'w')\n"
        "handler.stream.write('late\\n'); handler.stream.flush()\n"
        "other.close()\n"
        "with quiet_console('check'):\n"
        "    print('second session', file=sys.stderr)\n")
    env = {**os.environ, "N2N_LOG_DIR": str(tmp_path / "logs")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    logs = sorted((tmp_path / "logs").glob("check-*.log"))
    assert run.stderr.splitlines() == ["inside", f"n2n: messages of the libraries n2n uses went to {logs[0]}", "late",
                                       "second session"]
    assert (tmp_path / "other.txt").read_text() == "" and logs[0].read_text() == "to the log\n"


@pytest.mark.slow
def test_the_demos_console_is_clean(tmp_path):
    """`n2n demo` (bulk denoise and a short training, each on a private Ray): n2n's lines and bars only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "N2N_DEBUG")}
    env["N2N_LOG_DIR"] = str(tmp_path / "logs")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--out", str(tmp_path / "demo"), "--photo",
                          "astronaut", "--max-side", "48", "--train-steps", "2"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = sorted((tmp_path / "logs").glob("demo-*.log"))
    assert len(logs) == 1 and "Execution plan of Dataset" in logs[0].read_text()
    out = run.stdout.splitlines()
    assert out[0].split() == ["photo", "noisy", "dB", "denoised", "dB"] and out[1].startswith("astronaut.png")
    assert out[2:] == [f"mean gain {out[2].split()[2]} dB; report picture: {tmp_path / 'demo' / 'report.png'}"]
    started = ("n2n: started a private Ray in this process (no --address and no RAY_ADDRESS): 1 node, N CPUs, 0 GPUs; "
               "pass --address auto to use the Ray cluster running on this node")
    train_bar = re.compile(r"^ *\d+%\|[^|]*\| \d/2 \[[^\]]*\]$")
    lines = [line for line in re.split(r"[\r\n]", run.stderr) if line.strip()]
    seen = [re.sub(r"\b\d+ CPUs\b", "N CPUs", line) for line in lines]
    assert seen.count(started) == 2 and seen.count(f"n2n: Ray's logs: {logs[0]} (--verbose shows them here)") == 1
    kinds = {"<denoise bar>" if re.match(r"^denoise: +\d+%\|[^|]*\| \d/1 \[", line) else
             "<training bar>" if train_bar.match(line) else line for line in seen}
    assert kinds == {started, f"n2n: Ray's logs: {logs[0]} (--verbose shows them here)", "<denoise bar>",
                     "<training bar>"}, lines
