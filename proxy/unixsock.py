"""Unix socket paths a listener owns: made room for at start, removed at stop only if still the one we bound.

A second daemon started with the same socket path must never break the first: it refuses to take a live socket, and
its cleanup removes only a socket file it created itself (same device and inode as when it bound), never one that
another process is listening on.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


def prepare_socket_path(path: Path) -> None:
    """Make room for a unix socket: remove a stale one, refuse to take a live one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over from a crashed run
        else:
            raise OSError(f"{path} is in use by a running process")
        finally:
            probe.close()
    elif path.exists():
        raise OSError(f"{path} exists and is not a socket")


@dataclass(frozen=True)
class OwnedSocket:
    """A socket file this process bound (its device and inode taken right after the bind)."""

    path: Path
    dev: int
    ino: int

    @classmethod
    def of(cls, path: Path) -> OwnedSocket:
        st = os.stat(path)
        return cls(path, st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Unlink the path if it is still our socket file (not a newer one another process bound there)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (self.dev, self.ino):
            self.path.unlink(missing_ok=True)
