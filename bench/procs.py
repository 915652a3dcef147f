"""Process helpers for the benchmarks: start and stop what we started (by PID), and read /proc.

Every process the benchmark starts goes through :func:`spawn` and is stopped by :func:`stop` (SIGTERM, a bounded
wait, then SIGKILL), so nothing outlives a run and nothing we did not start is touched. An interrupted run stops them
too: :func:`on_interrupt` turns SIGTERM, SIGINT, SIGHUP and SIGALRM (the ``--deadline``) into :class:`Interrupted`,
which unwinds through every ``finally`` that stops what it started, and :func:`stop_all` stops whatever is left. A
run killed with SIGKILL cannot clean up: every spawned child gets SIGKILL from the kernel when we die
(``PR_SET_PDEATHSIG``), so even then nothing started here keeps running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NOFILE = 65536
PR_SET_PDEATHSIG = 1
_LIVE: list[subprocess.Popen[bytes]] = []


class Interrupted(SystemExit):
    """A signal stopped the run (a SystemExit, so asyncio's loop and every ``finally`` let it through)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _interrupted(signum: int, frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the cleanup that follows runs to its end
    signal.alarm(0)
    raise Interrupted(signum)


def on_interrupt(deadline: float | None = None) -> None:
    """SIGTERM, SIGINT, SIGHUP and (after ``deadline`` seconds) SIGALRM raise :class:`Interrupted`."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _interrupted)
    if deadline:
        signal.alarm(max(1, int(deadline)))


def _child_setup() -> None:
    """In the child before exec: the raised file limit, and SIGKILL when the benchmark process dies."""
    raise_nofile()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def stop_all() -> None:
    """Stop every process :func:`spawn` started that is still running (newest first)."""
    while _LIVE:
        stop(_LIVE.pop())
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile(limit: int = NOFILE) -> None:
    """Raise this process's open-file limit (as far as allowed): thousands of tunnels and streams need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(argv: list[str], *, log: Path, env: dict[str, str] | None = None, stdin: bool = False,
          stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with a raised file limit; stderr (and stdout unless piped) go to ``log``."""
    out = open(log, "ab")  # handed to the child, closed below
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else out, stderr=out, env=env, start_new_session=True,
            close_fds=True, preexec_fn=_child_setup,
        )
    finally:
        out.close()
    _LIVE.append(proc)
    return proc


def wait_line(proc: subprocess.Popen[bytes], token: bytes, timeout: float) -> bytes:
    """Read the child's stdout until a line containing ``token``; raise if it exits or the time runs out."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            for line in buf.splitlines():
                if token in line:
                    return line
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"process {proc.args!r} did not print {token!r} (rc={proc.poll()}, output={buf[-500:]!r})")


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps."""
    if proc is None:
        return
    with contextlib.suppress(ValueError):
        _LIVE.remove(proc)
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5.0)


@dataclass(frozen=True)
class Usage:
    """A process's memory and cumulative CPU time at one moment."""

    at: float
    rss: int
    pss: int
    cpu_seconds: float


def usage(pid: int) -> Usage:
    """RSS and PSS (bytes, from smaps_rollup) and user+system CPU seconds of ``pid``."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return Usage(time.monotonic(), rss, pss, cpu)


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s live threads, in seconds at nanosecond resolution (``/proc/PID/task/*/schedstat``).

    Finer than :func:`usage`'s clock ticks (10 ms), which matters for per-request figures of a fraction of a
    millisecond; threads that already exited are not counted, so use it across spans where none ends.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def sched_seconds(pids: list[int]) -> tuple[float, float]:
    """Seconds ``pids``' live threads spent on a CPU and waiting on a run queue for one (runnable, not running):
    the first two fields of ``/proc/PID/task/*/schedstat``. A process whose two add up to the wall time never
    waited for anything but a CPU."""
    run = wait = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (task / "schedstat").read_text().split()
                run += int(fields[0])
                wait += int(fields[1])
    return run / 1e9, wait / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle so far, all cores (``/proc/stat``): every process, ours or not."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # user..steal, less idle and iowait


def cpu_percent(before: Usage, after: Usage) -> float:
    """CPU use between two samples, in percent of one core."""
    return 100.0 * (after.cpu_seconds - before.cpu_seconds) / max(after.at - before.at, 1e-9)


def machine_load() -> dict[str, object]:
    """The conditions of a run: cores, load averages, and the busiest other processes' CPU right now."""
    load1, load5, load15 = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg": [load1, load5, load15]}
