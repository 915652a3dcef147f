"""File helpers shared by the certs package: atomic writes of secrets (0600) and public material.

A secret is written to a temporary file in the target's directory that is created with mode 0600 (never a moment
with looser permissions), flushed and fsynced, then renamed over the target, and the directory is fsynced so the
rename survives a crash. Readers therefore see either the old file or the complete new one. A directory a secret
needs that does not exist yet is created 0700 (``tunneld ca init`` making ``pki/``); existing directories are left as
they are.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

MAX_READ = 1024 * 1024
"""Upper bound for PEM/CSV/token files read by this package."""


class FileTooLarge(ValueError):
    """A file is larger than the package is willing to read."""


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        private = mode & 0o077 == 0
        directory.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we asked for; never adds any beyond ``mode``
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_secret(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 from the moment the file exists."""
    _write_atomic(Path(path), data, 0o600)


def write_public(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically write non-secret ``data`` (certificates, public keys, kubeconfigs without keys)."""
    _write_atomic(Path(path), data, mode)


def read_limited(path: Path, limit: int = MAX_READ) -> bytes:
    """Read a whole file, refusing files larger than ``limit`` bytes."""
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"{path}: larger than {limit} bytes")
    return data


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """Raise :class:`FileExistsError` naming every existing path, unless ``force``."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
