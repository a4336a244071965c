"""The manifest of a denoising job: one JSON line per input and outcome.

Each line is {"key", "status", "reason", "output", "megapixels", "seconds", "run",
"time"} with status "done" (written), "skipped" (done by an earlier run) or "failed"
(with its reason). Lines are appended with one `write` on a file opened in append
mode and flushed, so a killed job leaves at worst one torn last line, which readers
ignore. The file is a log: a key's latest line is its state, and a rerun treats keys
whose latest line is "done" or "skipped" as finished.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "_manifest.jsonl"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
FINISHED = (DONE, SKIPPED)


@dataclass(frozen=True)
class Entry:
    """One input's outcome. `output` is the written file (relative to the output root)."""

    key: str
    status: str
    reason: str = ""
    output: str = ""
    megapixels: float = 0.0
    seconds: float = 0.0


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """Latest record per key from a manifest file ({} if there is none).

    Lines that do not parse (a torn last line after a kill) are ignored.
    """
    latest: dict[str, dict] = {}
    path = Path(path)
    if not path.is_file():
        return latest
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                latest[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return latest


class ManifestWriter:
    """Appends entries to the manifest; each `append` is flushed to the OS at once.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | os.PathLike, run: str):
        self.path = Path(path)
        self.run = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()
        # A torn line from a killed run must not glue onto our first line.
        if self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, entries: list[Entry]) -> None:
        """Write entries as JSON lines in one system call."""
        if not entries:
            return
        now = time.time()
        lines = []
        for e in entries:
            record = {
                "key": e.key, "status": e.status, "reason": e.reason, "output": e.output,
                "megapixels": round(e.megapixels, 6), "seconds": round(e.seconds, 6),
                "run": self.run, "time": now,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
        os.write(self._fd, ("\n".join(lines) + "\n").encode("utf-8"))
        if time.monotonic() - self._last_sync > 5.0:
            os.fsync(self._fd)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
