"""``python -m bench.dialin --quick``: dial-in beside dial-out through one gateway process, with the real sshd on
one node and the real ``ssh -N -R`` on the other; both paths carry the sink's bytes (the sink confirms the count)
and answer requests, and the table names both."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import sshbed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_bench_dialin_quick_measures_both_paths() -> None:
    if not os.access(sshbed.SSHD, os.X_OK) or shutil.which("ssh") is None:
        pytest.skip("needs sshd and ssh")
    proc = subprocess.run([sys.executable, "-m", "bench.dialin", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=170, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^(dial-out|dial-in)\s+([\d.]+)\s+([\d.]+) /\s+([\d.]+)$", proc.stdout, re.M)}
    assert set(rows) == {"dial-out", "dial-in"}, proc.stdout
    for mib_per_s, keepalive_ms, fresh_ms in rows.values():
        assert mib_per_s > 0 and 0 < keepalive_ms and 0 < fresh_ms
    assert "dial-in / dial-out throughput:" in proc.stdout
