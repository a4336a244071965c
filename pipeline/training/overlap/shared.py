"""Memory shared by the processes of one node, and the Unix sockets that hand it over.

A node reducer makes one buffer for the weights and one gradient slot per worker of its
node. Each is anonymous memory (`memfd_create` on Linux; elsewhere a temporary file
unlinked at once), so nothing is ever left behind in /dev/shm or on disk: the kernel frees
it when the last process that maps it ends, a killed one included. The reducer passes the
file descriptors to its workers over a Unix socket (SCM_RIGHTS); on Linux the socket lives
in the abstract namespace (no file either), elsewhere in a private temporary folder.
"""
from __future__ import annotations

import mmap
import os
import secrets
import socket
import sys
import tempfile
import warnings

import torch

FD_PASSING = hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")  # POSIX, Python >= 3.9


def anonymous_memory(nbytes: int, name: str = "n2n") -> int:
    """A file descriptor of `nbytes` of zeroed memory that no path names."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:
        fd, path = tempfile.mkstemp(prefix=f"{name}-")
        os.unlink(path)
    try:
        os.ftruncate(fd, max(nbytes, 1))
    except BaseException:
        os.close(fd)
        raise
    return fd


class SharedTensor:
    """A 1-D tensor over a shared mapping of `fd` (which this object then owns and closes)."""

    def __init__(self, fd: int, numel: int, dtype: torch.dtype):
        self.fd, self.numel, self.dtype = fd, numel, dtype
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.map = mmap.mmap(fd, max(nbytes, 1))
        with warnings.catch_warnings():  # torch warns about non-writable buffers; this one is writable
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.frombuffer(self.map, dtype=dtype, count=numel)  # (numel,)

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype, name: str = "n2n") -> "SharedTensor":
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return cls(anonymous_memory(nbytes, name), numel, dtype)

    def close(self) -> None:
        """Drop this process's mapping (tensors made from it must be gone: they hold the memory)."""
        self.tensor = None
        try:
            self.map.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def unix_listener() -> tuple[socket.socket, str]:
    """A listening Unix socket only this node can reach; returns it and the address to give out."""
    name = f"n2n-{secrets.token_hex(12)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if sys.platform.startswith("linux"):
        address = "\0" + name  # abstract namespace: no file, gone with the socket
    else:
        folder = tempfile.mkdtemp(prefix="n2n-")  # 0700: only this user connects
        address = os.path.join(folder, "node.sock")
    sock.bind(address)
    sock.listen(64)
    return sock, address


def unix_connect(address: str, timeout: float = 30.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    sock.settimeout(None)
    return sock


def remove_listener(sock: socket.socket, address: str) -> None:
    sock.close()
    if not address.startswith("\0"):
        try:
            os.unlink(address)
            os.rmdir(os.path.dirname(address))
        except OSError:
            pass
