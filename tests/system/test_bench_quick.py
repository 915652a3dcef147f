"""``python -m bench --quick``, as a user runs it: the side-by-side tables printed, results.json and the plot written,
every path measured against the same real sshd and the scale point brought up, well within 3 minutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import sshbed

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bench_quick_prints_the_side_by_side_tables(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.access(sshbed.SSHD, os.X_OK) or shutil.which("ssh") is None:
        pytest.skip("needs root, sshd and ssh (the benchmark runs sshd in a network namespace)")
    pytest.importorskip("matplotlib")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 180, f"--quick took {seconds:.0f} s"
    for title in ("One stream through a real sshd", "Small requests", "Channel opens on one tunnel", "Scale",
                  "Targets"):
        assert title in proc.stdout, proc.stdout[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    s = results["sshd"]
    for path in ("direct", "ssh -L", "gateway"):
        assert s["throughput"][path]["mib_per_s"] > 0
    assert s["throughput"]["ratio_gateway_to_ssh"] > 0
    assert len(s["latency"]) == 7 and all(v["n"] == 300 and v["p50_ms"] > 0 for v in s["latency"].values())
    for path in ("ssh -L", "gateway CONNECT"):
        for mode in ("sequential", "concurrent"):
            assert s["channel_open"][path][mode]["errors"] == 0 and s["channel_open"][path][mode]["per_second"] > 0
    point = results["scale"]["points"][0]
    assert point["nodes"] == 100 and point["up_seconds"] > 0 and point["rss_per_tunnel_kib"] > 0
    assert point["streams"]["opened"] == point["streams"]["requested"] == 1000
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
