"""Done-when: with real OpenSSH nodes, ``tunneld status`` shows every node, and stopping one node's sshd turns its row
red (first in the table) within the health-probe period."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.sshbed import SshBed
from tests.waiting import wait_value
from tunneld.app import Gateway
from tunneld.config import load_config

from .conftest import write_config

pytestmark = pytest.mark.system

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RED = re.compile(r"\x1b\[(?:[0-9;]*;)?31m")
PROBE_PERIOD = 3.0


async def status_lines(sock: str) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "tunneld", "status", "--socket", sock, "--color", "always",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


def cells(line: str) -> list[str]:
    return ANSI.sub("", line).split()


async def test_stopped_sshd_turns_its_row_red_within_the_probe_period(bed: SshBed) -> None:
    for i in range(3):
        bed.add_node(f"node-{i}")
    path = write_config(bed, list(bed.nodes))
    sock = bed.workdir / "status.sock"
    text = path.read_text().replace('[status]\nsocket = ""', f'[status]\nsocket = "{sock}"')
    path.write_text(text.replace("period = 0.5", f"period = {PROBE_PERIOD}"))
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        def all_well(lines: list[str]) -> bool:
            rows = {cells(line)[0]: cells(line) for line in lines[1:]}
            return sorted(rows) == ["node-0", "node-1", "node-2"] and all(
                r[2] == "up" and r[7] == "lean" and r[8] == "ok" for r in rows.values())

        lines = await wait_value(lambda: status_lines(str(sock)), all_well, 30, "every row up and ok", interval=0.3)
        assert not any(RED.search(line) for line in lines), "nothing is red while all is well"

        bed.nodes["node-1"].kill_sshd()
        def red_first(lines: list[str]) -> bool:
            first = cells(lines[1])
            return first[0] == "node-1" and first[2] in ("down", "degraded") and bool(RED.search(lines[1]))

        lines = await wait_value(lambda: status_lines(str(sock)), red_first, PROBE_PERIOD + 2.0,
                                 "node-1's row to turn red, first", interval=0.1)
        assert [cells(line)[2] for line in lines[2:]] == ["up", "up"]
        assert not any(RED.search(line) for line in lines[2:])
    finally:
        await gw.stop()
