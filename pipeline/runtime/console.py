"""A quiet console: n2n's own lines and progress bars on the terminal, Ray's logs in the run's log.

`n2n demo`, `n2n denoise`, `n2n train`, `n2n sweep` and `n2n evaluate` run inside `quiet_console(command)`
(their `--verbose` turns it off). While it is on:

- file descriptor 2 of this process goes to the run's log, a new file
  `<temp>/n2n-<uid>/<command>-<date>-<time>-<pid>.log` (`N2N_LOG_DIR` picks another folder;
  never an existing file, never through a symlink):
  whatever a library writes there from C or C++, Ray's core among them (its driver writes
  errors such as "core_worker.cc: ... constructor arguments in the object store" there),
  lands in the log;
- `sys.stderr` writes to the terminal still (a duplicate of the original descriptor 2), so
  n2n's lines, its progress bars and its one-line errors show as before;
- Ray's and Ray Data's Python log records (token authentication, execution plans,
  "Progress bars disabled", ...) go to the log; those of level ERROR or above also show on
  the terminal, one line each (`ray: <first line>`);
- the lines Ray forwards from its workers (actors' prints and warnings) go to the log;
- Python warnings raised by n2n's own code show as one line (`n2n: warning: ...`), other
  libraries' warnings go to the log.
When Ray starts (`pipeline.runtime.ray_session.connect`), one line says where its logs go; a run
that never starts Ray but wrote to the log says so once at the end; an empty log is removed.

Decision: descriptor 2 itself is redirected because Ray's C++ core writes its errors
there, where no Python setting reaches them; everything written from Python is routed by
where it comes from. In a notebook, whose `sys.stderr` is not descriptor 2, `sys.stderr`
is left as it is.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path

LOG_DIR_ENV = "N2N_LOG_DIR"
_OWN_PACKAGES = tuple(str(Path(__file__).resolve().parents[2] / name) + os.sep for name in ("pipeline", "n2n_core", "n2n"))

_active: "_Session | None" = None


def log_folder() -> Path:
    """The folder of the runs' logs: $N2N_LOG_DIR, else `<temp>/n2n-<uid>` (made private: 0700,
    ours, not a symlink; a folder there that is not is never used, a fresh one is made instead)."""
    chosen = os.environ.get(LOG_DIR_ENV)
    if chosen:
        try:
            Path(chosen).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from pipeline.errors import UsageError

            raise UsageError(f"{LOG_DIR_ENV} {chosen!r} cannot hold the run's log: {e.strerror or e}") from None
        return Path(chosen)
    folder = Path(tempfile.gettempdir()) / f"n2n-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        return folder
    return Path(tempfile.mkdtemp(prefix=f"n2n-{os.getuid()}-"))


class _LogFile:
    """The run's log as a text file that several threads may write to (one lock)."""

    def __init__(self, fd: int):
        self._file = open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Session:
    def __init__(self, command: str):
        self.command = command
        self.path: Path | None = None
        self.announced = False
        self._restore: list = []  # undo steps, run in reverse by stop()
        self.log: _LogFile | None = None
        self.console = None
        self._ray_routed = False

    # -- start and stop ----------------------------------------------------------------
    def start(self) -> None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder, flags = log_folder(), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND | os.O_CLOEXEC
        for attempt in range(1, 1000):  # a new file, never one that exists (two runs in one second: -2, -3, ...)
            suffix = "" if attempt == 1 else f"-{attempt}"
            self.path = folder / f"{self.command}-{stamp}-{os.getpid()}{suffix}.log"
            try:
                fd = os.open(self.path, flags, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free log file name in {folder}")
        self.log = _LogFile(fd)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        saved = _console_fd()
        os.dup2(fd, 2)
        self._restore.append(lambda: os.dup2(saved, 2))
        original = sys.stderr
        if _writes_to_fd2(original):
            self.console = io.TextIOWrapper(io.FileIO(saved, "w", closefd=False), encoding=original.encoding or "utf-8",
                                            errors="backslashreplace", line_buffering=True, write_through=True)
            sys.stderr = self.console

            def back() -> None:
                with contextlib.suppress(Exception):
                    self.console.flush()
                sys.stderr = original
            self._restore.append(back)
        else:
            self.console = original
        self._route_warnings()
        if "ray" in sys.modules:
            self.route_ray_handlers()

    def stop(self) -> None:
        while self._restore:
            with contextlib.suppress(Exception):
                self._restore.pop()()
        if self.log is not None:
            self.log.close()
            if self.path.stat().st_size == 0:
                self.path.unlink()
            elif not self.announced:
                print(f"n2n: messages of the libraries n2n uses went to {self.path}", file=sys.stderr, flush=True)

    # -- routes ------------------------------------------------------------------------
    def _route_warnings(self) -> None:
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if str(Path(filename).resolve()).startswith(_OWN_PACKAGES):
                text = " ".join(str(message).split())
                print(f"n2n: warning: {text}", file=sys.stderr, flush=True)
            else:
                self.log.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = showwarning
        self._restore.append(lambda: setattr(warnings, "showwarning", show))

    def route_ray_handlers(self) -> None:
        """Ray's console handler class (the "ray" and "ray.data" loggers both use it) writes to
        the log while the session is on; errors also show as one line."""
        if self._ray_routed:
            return
        self._ray_routed = True
        try:
            from ray._private.log import PlainRayHandler
        except ImportError:  # no Ray in this installation: nothing of it to route
            return
        formatter = logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s")
        original = PlainRayHandler.emit
        session = self

        def emit(handler, record):
            try:
                session.log.write(formatter.format(record) + "\n")
                if record.levelno >= logging.ERROR:
                    first = " ".join(record.getMessage().split("\n")[0].split())
                    print(f"ray: {first}", file=sys.stderr, flush=True)
            except Exception:
                handler.handleError(record)

        PlainRayHandler.emit = emit
        self._restore.append(lambda: setattr(PlainRayHandler, "emit", original))

    def after_ray_init(self) -> None:
        """Ray's workers' forwarded lines into the log (ray.init registers their printer)."""
        try:
            from ray._private import worker
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        log = self.log

        def to_log(data) -> None:
            worker.print_worker_logs(data, log)

        swapped = []
        with dispatcher._lock:
            for index, (name, handler) in enumerate(dispatcher.handlers):
                if name == "ray_print_logs":
                    dispatcher.handlers[index] = (name, to_log)
                    swapped.append(handler)

        def back() -> None:
            with dispatcher._lock:
                for index, (name, handler) in enumerate(dispatcher.handlers):
                    if handler is to_log and swapped:
                        dispatcher.handlers[index] = (name, swapped[0])
        if swapped:
            self._restore.append(back)


_console_fds: dict = {}  # (st_dev, st_ino) of a terminal or file -> a duplicate of descriptor 2 that pointed at it


def _console_fd() -> int:
    """A duplicate of descriptor 2 as it is now (the console), kept open for the life of the
    process: streams made on it during a session (a progress bar, a logging handler) may
    outlive the session, and must go on writing to the console, never to a descriptor number
    reused by some other file. One per console, however many sessions."""
    info = os.fstat(2)
    key = (info.st_dev, info.st_ino)
    fd = _console_fds.get(key)
    if fd is not None:
        with contextlib.suppress(OSError):
            same = os.fstat(fd)
            if (same.st_dev, same.st_ino) == key:
                return fd
    fd = os.dup(2)
    os.set_inheritable(fd, False)
    _console_fds[key] = fd
    return fd


def _writes_to_fd2(stream) -> bool:
    try:
        return stream is not None and stream.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def quiet_console(command: str, *, verbose: bool = False):
    """Run the body with the quiet console of the module docstring (`verbose`: as before, Ray's
    logs live). Nested uses (the demo's jobs inside the demo) join the outermost one."""
    global _active
    if _active is not None or verbose:
        yield _active
        return
    try:
        os.fstat(2)
    except OSError:  # no descriptor 2 at all: nothing to keep quiet
        yield None
        return
    session = _Session(command)
    _active = session
    try:
        session.start()
        yield session
    finally:
        _active = None
        session.stop()


def ray_starting() -> None:
    """Called by `pipeline.runtime.ray_session.connect` right before ray.init: Ray's Python logging
    into the log (ray.init itself warns, e.g. about token authentication)."""
    if _active is not None and _active.log is not None:
        _active.route_ray_handlers()


def ray_started() -> None:
    """Called by `pipeline.runtime.ray_session.connect` right after ray.init: routes the workers' lines
    and says once where Ray's logs go."""
    session = _active
    if session is None or session.log is None:
        return
    session.after_ray_init()
    if not session.announced:
        session.announced = True
        print(f"n2n: Ray's logs: {session.path} (--verbose shows them here)", file=sys.stderr, flush=True)


def active_log() -> Path | None:
    """The log file of the quiet console now on, or None."""
    return None if _active is None else _active.path
