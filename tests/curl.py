"""Running the real curl from async tests, without blocking the event loop the gateway under test runs on."""

from __future__ import annotations

import asyncio
import subprocess


async def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``curl -sS --max-time TIMEOUT ARGS...``; stdout as bytes (exactly what came over the wire)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(timeout), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(["curl", *args], proc.returncode, out, err)
