"""The commands a simulated container runs, over any channel transport (WebSocket channels or SPDY streams).

A transport is a :class:`ProcessIO`: ``send(channel, data)`` (1 stdout, 2 stderr, 3 error) and ``receive()``, which
gives the client's frames (0 stdin, 4 resize; ``close`` on channel 0 is stdin's end) and None when the client is gone.

* ``cat`` copies stdin to stdout until stdin ends; ``cat FILE...`` prints files of the pod's filesystem;
* ``echo ARGS...``; ``sh -c "exit N"`` exits with N; ``test -d|-f|-e PATH``; ``ls [DIR]``;
* ``tar cf - PATH`` and ``tar -xmf - [-C DIR]`` (also without the dash): what ``kubectl cp`` runs
  (:mod:`tunneld.dev.containerfs`);
* anything else prints ``command not found`` on stderr and exits 127.

Without ``stdin`` (no ``input=1`` in the request) a process sees an empty stdin.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from typing import Any, Protocol

from tunneld.dev.channels import ERROR, STDERR, STDIN, STDOUT, Frame, ProtocolError
from tunneld.dev.containerfs import CHUNK, MAX_BYTES, ContainerFS, FSError

log = logging.getLogger("tunneld.dev.kubelet")
_EXIT = re.compile(r"^\s*exit\s+([0-9]{1,3})\s*$")


class ProcessIO(Protocol):
    """The channels of one exec or attach session."""

    async def send(self, channel: int, data: bytes) -> bool: ...

    async def receive(self) -> Frame | None: ...

    async def close(self) -> None: ...


def status_json(code: int, argv: list[str]) -> bytes:
    """The metav1.Status the kubelet sends on the error channel when a command ends."""
    if code == 0:
        status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    else:
        status = {
            "metadata": {},
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(argv)}], exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    return json.dumps(status, separators=(",", ":")).encode()


async def _copy_stdin(conn: ProcessIO) -> None:
    """``cat``: stdin to stdout until stdin ends (a close of channel 0, or the client leaving)."""
    while True:
        frame = await conn.receive()
        if frame is None or (frame.close and frame.channel == STDIN):
            return
        if frame.channel == STDIN and frame.data:
            if not await conn.send(STDOUT, frame.data):
                return
        # resize (4) and anything else: nothing to do for a simulated process


async def read_stdin(conn: ProcessIO, limit: int) -> bytes:
    """All of stdin (until its end), at most ``limit`` bytes (else :class:`FSError`, as a full disk)."""
    data = bytearray()
    while True:
        frame = await conn.receive()
        if frame is None or (frame.close and frame.channel == STDIN):
            return bytes(data)
        if frame.channel == STDIN:
            data += frame.data
            if len(data) > limit:
                raise FSError("write error: No space left on device")


async def _send_all(conn: ProcessIO, channel: int, data: bytes) -> None:
    for i in range(0, len(data), CHUNK):
        if not await conn.send(channel, data[i:i + CHUNK]):
            return


def _tar_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """``tar cf - PATH`` / ``tar -xmf - [-C DIR]`` -> (mode, operands); None for any other tar invocation."""
    if len(argv) < 3:
        return None
    flags = argv[1].lstrip("-")
    if argv[2] != "-" or "f" not in flags or flags.count("c") + flags.count("x") != 1 or set(flags) - set("cxmfv"):
        return None
    return ("c" if "c" in flags else "x"), argv[3:]


async def _tar(conn: ProcessIO, argv: list[str], fs: ContainerFS, stdin: bool) -> int:
    parsed = _tar_args(argv)
    if parsed is None:
        await conn.send(STDERR, f"tar: unsupported invocation: {shlex.join(argv)}\n".encode())
        return 2
    mode, rest = parsed
    if mode == "c":
        if len(rest) != 1:
            await conn.send(STDERR, b"tar: expected one PATH\n")
            return 2
        await _send_all(conn, STDOUT, fs.tar_create(rest[0]))
        return 0
    directory = "/"
    if rest[:1] == ["-C"] and len(rest) == 2:
        directory = rest[1]
    elif rest:
        await conn.send(STDERR, f"tar: unexpected arguments {shlex.join(rest)}\n".encode())
        return 2
    archive = await read_stdin(conn, MAX_BYTES) if stdin else b""
    for message in fs.tar_extract(archive, directory):
        await conn.send(STDERR, (message + "\n").encode())
    return 0


async def run_command(conn: ProcessIO, argv: list[str], stdin: bool, fs: ContainerFS | None = None) -> int:
    """Run a simulated command over ``conn`` and return its exit code (see the module docstring)."""
    fs = fs if fs is not None else ContainerFS()
    name = argv[0] if argv else ""
    try:
        if name == "cat" and len(argv) == 1:
            if stdin:
                await _copy_stdin(conn)
            return 0
        if name == "cat":
            for path in argv[1:]:
                if path not in fs.files:
                    raise FSError(f"cat: {path}: No such file or directory", 1)
                await _send_all(conn, STDOUT, fs.files[path])
            return 0
        if name == "echo":
            await conn.send(STDOUT, (" ".join(argv[1:]) + "\n").encode())
            return 0
        if name == "sh" and len(argv) == 3 and argv[1] == "-c" and (m := _EXIT.match(argv[2])):
            return int(m.group(1)) % 256
        if name == "test" and len(argv) == 3 and argv[1] in ("-d", "-f", "-e"):
            found = {"-d": fs.is_dir(argv[2]), "-f": argv[2] in fs.files}.get(argv[1],
                                                                              fs.is_dir(argv[2]) or argv[2] in fs.files)
            return 0 if found else 1
        if name == "ls" and len(argv) <= 2:
            base = (argv[1] if len(argv) == 2 else "/").rstrip("/") or "/"
            if not fs.is_dir(base):
                raise FSError(f"ls: cannot access '{base}': No such file or directory")
            prefix = base.rstrip("/") + "/"
            names = {p[len(prefix):].split("/")[0] for p in (*fs.files, *fs.dirs) if p.startswith(prefix) and p != base}
            await conn.send(STDOUT, "".join(n + "\n" for n in sorted(names)).encode())
            return 0
        if name == "tar":
            return await _tar(conn, argv, fs, stdin)
    except FSError as exc:
        await conn.send(STDERR, (exc.message + "\n").encode())
        return exc.code
    await conn.send(STDERR, f"{shlex.join(argv) or '(empty)'}: command not found\n".encode())
    return 127


async def exec_session(conn: ProcessIO, argv: list[str], stdin: bool, fs: ContainerFS | None = None) -> None:
    """Run ``argv``, send its status on the error channel, close the session."""
    try:
        code = await run_command(conn, argv, stdin, fs)
    except ProtocolError as exc:
        log.info("exec stream protocol error: %s", exc)
        await conn.close()
        return
    await conn.send(ERROR, status_json(code, argv))
    await conn.close()
