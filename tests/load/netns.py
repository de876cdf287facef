"""Sockets opened in another network namespace (a container's), with setns(2) through ctypes.

The bench's clients reach nginx from inside its container's namespace (at
127.0.0.1:80, with no docker-proxy in between) while every other part of the
process stays in the host's namespace: the calling thread switches to the
target namespace only for the socket(2) call, and straight back. A socket stays
in the namespace it was created in, so connecting and all its traffic happen
there. Python 3.11 has no os.setns; this needs root (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fds: dict[str, int] = {}  # namespace path -> an open fd on it (kept for the life of the process)


def _fd(path: str) -> int:
    """An fd on the namespace file `path`, opened once."""
    if path not in _fds:
        _fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return _fds[path]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns(CLONE_NEWNET): {os.strerror(errno)}")


@contextlib.contextmanager
def entered(path: str | None) -> Iterator[None]:
    """The calling thread in the network namespace `path` (None: stay) until the block ends.

    Keep the block synchronous (no await, no thread switch): it is meant for
    creating sockets, not for running code there.
    """
    if path is None:
        yield
        return
    home = _fd("/proc/thread-self/ns/net")
    _setns(_fd(path))
    try:
        yield
    finally:
        _setns(home)


def tcp_socket(netns: str | None) -> socket.socket:
    """A non-blocking TCP socket created in `netns` (None: this process's own namespace)."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def of_pid(pid: int) -> str:
    """The network namespace file of a process (e.g. a container's main process)."""
    return f"/proc/{pid}/ns/net"
