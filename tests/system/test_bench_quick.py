"""``python -m bench --quick``, as a user runs it: every figure printed beside its target, results.json (keys that say
what they are) and the plot written, every path measured against real sshds and the scale point brought up, within
150 s. And interrupted (SIGINT, SIGTERM, its own ``--deadline``), it leaves no process behind: every process the run
started carries a marker in its environment, and none is alive once the benchmark has exited."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import sshbed

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MARK = "TUNNELD_BENCH_TEST_MARK"


def _need_bench() -> None:
    if os.geteuid() != 0 or not os.access(sshbed.SSHD, os.X_OK) or shutil.which("ssh") is None:
        pytest.skip("needs root, sshd and ssh (the benchmark runs sshd in a network namespace)")
    pytest.importorskip("matplotlib")


def _start(args: list[str], mark: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=dict(os.environ, **{MARK: mark}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for the benchmark; on a timeout stop it the way a harness should (SIGTERM, then SIGKILL)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
        raise AssertionError(f"the benchmark ran over {timeout} s; stderr: {err[-3000:]}") from None


def _marked(mark: str) -> list[str]:
    """Processes whose environment carries ``mark``: everything the benchmark run started (and its descendants)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                found.append(f"{d.name}: {cmdline!r}")
        except OSError:
            continue
    return found


@pytest.mark.timeout(300)
def test_bench_quick_prints_every_figure_beside_its_target(tmp_path: Path) -> None:
    _need_bench()
    mark = uuid.uuid4().hex
    started = time.monotonic()
    proc = _start(["--quick", "--out", str(tmp_path)], mark)
    out, err = _finish(proc, 240)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, err[-3000:]
    assert seconds < 150, f"--quick took {seconds:.0f} s"
    assert _marked(mark) == []
    for title in ("One stream upload through a real sshd", "One stream download through a real sshd",
                  "Small requests", "Channel opens on one tunnel", "8 streams at once", "Scale", "Targets"):
        assert title in out, out[-3000:]
    for metric in ("throughput upload, gateway / ssh -L", "throughput download, gateway / ssh -L",
                   "CPU per GiB upload, gateway / ssh", "gateway CPU per proxy-URL request",
                   "channel opens concurrent, gateway / ssh -L", "8 streams over 8 tunnels upload",
                   "RSS per idle tunnel", "status p99 while opening 1000 streams"):
        assert metric in out, out[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    s = results["sshd"]
    assert s["rounds"] == 3 and s["tunnels"] == 8
    for direction in ("upload", "download"):
        sec = s["throughput"][direction]
        for path in ("direct", "ssh -L", "gateway CONNECT", "gateway gRPC"):
            assert sec[path]["mib_per_s"] > 0 and len(sec[path]["runs"]) == 3
        for path in ("ssh -L", "gateway CONNECT", "gateway gRPC"):
            assert sec[path]["cpu_s_per_gib"] > 0
        assert sec["ratio_gateway_to_ssh"] > 0 and len(sec["ratio_gateway_to_ssh_rounds"]) == 3
        assert sec["cpu_ratio_gateway_to_ssh"] > 0 and sec["ratio_grpc_to_connect"] > 0
        par = s["parallel"][direction]
        assert par["ssh -L"]["aggregate_mib_per_s"] > 0 and par["ratio_gateway_to_ssh"] > 0
        gw = par["gateway CONNECT"]  # where the gateway stood while it forwarded: on a CPU, or waiting for one
        assert 0 < gw["on_cpu_cores"] <= gw["machine_busy_cores"] <= (os.cpu_count() or 1) + 0.05
        assert gw["runqueue_wait_per_s"] >= 0
    assert len(s["latency"]) == 8 and all(v["n"] == 600 and v["p50_ms"] > 0 for v in s["latency"].values())
    for name in ("ssh -L (new connection = new channel)", "gateway proxy URL (new channel per request)",
                 "gateway gRPC (new dial = new channel)"):
        assert s["cpu_ms_per_request"][name]["median"] > 0
    assert s["latency_added"]["grpc_dial_vs_connect_new_channel"]["median"] > 0
    for path in ("ssh -L", "gateway CONNECT"):
        for mode in ("sequential", "concurrent"):
            assert s["channel_open"][path][mode]["errors"] == 0 and s["channel_open"][path][mode]["per_second"] > 0
    point = results["scale"]["points"][0]
    assert point["nodes"] == 100 and point["up_seconds"] > 0 and point["rss_per_tunnel_kib"] > 0
    assert point["streams"]["opened"] == point["streams"]["requested"] == 1000
    di = results["dialin"]  # dial-in (the node's ssh -N -R) beside dial-out, same gateway
    assert "Dial-in beside dial-out" in out
    assert all(di["throughput"][p]["mib_per_s"] > 0 for p in ("dial-out", "dial-in"))
    assert di["ratio_dialin_to_dialout_throughput"] > 0 and len(di["latency"]) == 4
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _interrupt_at(args: list[str], line: str, sig: int | None, tmp_path: Path) -> tuple[int, str]:
    """Start the benchmark, wait for ``line`` on its stderr, send ``sig`` (None: let its own deadline fire)."""
    mark = uuid.uuid4().hex
    proc = _start([*args, "--out", str(tmp_path)], mark)
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 150
    try:
        while line not in seen:
            assert time.monotonic() < deadline, f"never saw {line!r}: {seen[-2000:]}"
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536).decode(errors="replace")
                assert chunk, f"the benchmark exited before {line!r}: {seen[-2000:]}"
                seen += chunk
        assert _marked(mark), "the benchmark's children do not carry the marker: the check below would prove nothing"
        if sig is not None:
            proc.send_signal(sig)
        _, err = _finish(proc, 90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert _marked(mark) == [], f"left running after {sig}: {_marked(mark)}"
    return proc.returncode, seen + err


@pytest.mark.timeout(300)
def test_sigint_during_the_sshd_part_stops_every_process(tmp_path: Path) -> None:
    _need_bench()
    rc, err = _interrupt_at(["--quick", "--only", "sshd"], "round 1 up", signal.SIGINT, tmp_path)
    assert rc == 128 + signal.SIGINT and "interrupted by signal 2" in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.timeout(300)
def test_sigterm_with_a_node_sigstopped_stops_every_process(tmp_path: Path) -> None:
    _need_bench()
    rc, err = _interrupt_at(["--quick", "--only", "scale"], "stopped (SIGSTOP)", signal.SIGTERM, tmp_path)
    assert rc == 128 + signal.SIGTERM and "interrupted by signal 15" in err


@pytest.mark.timeout(300)
def test_the_deadline_stops_the_run_and_every_process(tmp_path: Path) -> None:
    _need_bench()
    rc, err = _interrupt_at(["--quick", "--only", "sshd", "--deadline", "20"], "nodes (", None, tmp_path)
    assert rc == 128 + signal.SIGALRM and "interrupted by signal 14" in err


@pytest.mark.timeout(300)
def test_scale_part_runs_only_the_named_measurements(tmp_path: Path) -> None:
    """``--only scale --scale-part streams``: the idle streams and the status API's latency, without the idle-CPU
    window (and its SIGSTOPped node) or the restart storm; what was left out is absent from results.json."""
    _need_bench()
    mark = uuid.uuid4().hex
    proc = _start(["--quick", "--only", "scale", "--scale-part", "streams", "--out", str(tmp_path)], mark)
    out, err = _finish(proc, 200)
    assert proc.returncode == 0, err[-3000:]
    assert _marked(mark) == []
    assert "SIGSTOP" not in err and "restart storm" not in err
    assert "status p99 while opening 1000 streams" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["command"] == "python -m bench --quick --only scale --scale-part streams"
    point = results["scale"]["points"][0]
    assert point["streams"]["opened"] == 1000 and point["streams"]["gateway_gc"]["tuned"] is True
    assert point["idle_cpu_percent"] is None and point["notice_seconds"] is None and "restart_storm" not in point
