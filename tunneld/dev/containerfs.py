"""An in-memory filesystem for a simulated pod, and the commands ``kubectl cp`` runs in it.

``kubectl cp`` execs, in the container: ``test -d DEST`` (is the destination a directory?), ``tar -xmf - -C DIR``
(local -> pod: a tar stream on stdin) and ``tar cf - SRC`` (pod -> local: a tar stream on stdout, member names
without the leading ``/``, as GNU tar writes them). These behave as GNU tar and coreutils do for what kubectl asks;
``cat FILE`` and ``ls DIR`` help tests look inside. Everything is bounded: :data:`MAX_BYTES` per filesystem (an
upload that would exceed it fails as a full disk would), and member names are confined to the filesystem (absolute
names lose their ``/``, names with ``..`` are skipped with a message, as GNU tar does).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass, field

MAX_BYTES = 64 * 1024 * 1024
CHUNK = 32 * 1024


class FSError(Exception):
    """A command failed: ``message`` for stderr, ``code`` for the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def norm(path: str, cwd: str = "/") -> str:
    """An absolute, normalised path (no ``.``/``..``; ``..`` never climbs above ``/``)."""
    joined = posixpath.normpath(posixpath.join(cwd, path))
    return "/" + joined.lstrip("/") if joined not in ("", ".") else "/"


@dataclass
class ContainerFS:
    """Files (path -> bytes) and directories; ``/``, ``/tmp`` and ``/etc`` exist from the start."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {"/", "/tmp", "/etc"})

    @property
    def used(self) -> int:
        return sum(len(v) for v in self.files.values())

    def is_dir(self, path: str) -> bool:
        return norm(path) in self.dirs

    def mkdirs(self, path: str) -> None:
        path = norm(path)
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d in self.files:
                raise FSError(f"{d}: Not a directory")
            self.dirs.add(d)

    def write(self, path: str, data: bytes) -> None:
        path = norm(path)
        if path in self.dirs:
            raise FSError(f"{path}: Is a directory")
        if self.used - len(self.files.get(path, b"")) + len(data) > MAX_BYTES:
            raise FSError(f"{path}: Cannot write: No space left on device")
        self.mkdirs(posixpath.dirname(path))
        self.files[path] = data

    def tree(self, path: str) -> tuple[list[str], list[str]]:
        """(directories, files) at and under ``path``, sorted."""
        prefix = path.rstrip("/") + "/"
        dirs = sorted(d for d in self.dirs if d == path or d.startswith(prefix))
        files = sorted(f for f in self.files if f.startswith(prefix))
        return dirs, files

    # --- the commands -----------------------------------------------------------------------------------

    def tar_create(self, source: str) -> bytes:
        """``tar cf - SOURCE``: a tar archive of a file or a directory tree (names without the leading ``/``)."""
        path = norm(source)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            if path in self.files:
                self._add_file(tar, path)
            elif path in self.dirs:
                dirs, files = self.tree(path)
                for d in dirs:
                    info = tarfile.TarInfo(d.lstrip("/") or ".")
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                for f in files:
                    self._add_file(tar, f)
            else:
                raise FSError(f"tar: {source}: Cannot stat: No such file or directory\n"
                              "tar: Exiting with failure status due to previous errors")
        return out.getvalue()

    def _add_file(self, tar: tarfile.TarFile, path: str) -> None:
        data = self.files[path]
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    def tar_extract(self, archive: bytes, directory: str) -> list[str]:
        """``tar -xmf - -C DIRECTORY``; returns the messages for stderr (skipped members)."""
        base = norm(directory)
        if base not in self.dirs:
            raise FSError(f"tar: {directory}: Cannot open: No such file or directory")
        messages = []
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
                for member in tar:
                    name = member.name.lstrip("/")
                    if ".." in name.split("/"):
                        messages.append(f"tar: {member.name}: Member name contains '..'")
                        continue
                    target = norm(name, base)
                    if member.isdir():
                        self.mkdirs(target)
                    elif member.isfile():
                        reader = tar.extractfile(member)
                        assert reader is not None
                        self.write(target, reader.read(MAX_BYTES + 1))
                    else:
                        messages.append(f"tar: {member.name}: only files and directories are simulated; skipped")
        except (tarfile.TarError, EOFError) as exc:
            raise FSError(f"tar: This does not look like a tar archive ({exc})") from exc
        return messages


def seed(fs: ContainerFS, pod: str, container: str) -> None:
    """What every simulated container holds at start."""
    fs.write("/etc/hostname", f"{pod}\n".encode())
    fs.write("/srv/hello.txt", f"hello from {pod}/{container}\n".encode())
