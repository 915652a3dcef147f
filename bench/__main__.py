"""``python -m bench [--quick]``: the gateway and OpenSSH side by side; prints tables, writes JSON and a PNG.

Needs root (network namespaces and sshd for the comparison, many file descriptors for scale), OpenSSH's ``sshd`` and
``ssh``, and matplotlib (the ``bench`` extra; checked before anything is measured). ``--quick`` (within 150 s on 2
cores) runs 3 interleaved rounds at small sizes and one scale point with short keepalives; the full run is 5 rounds
of 1 GiB each way per path, 2,000 requests per path per round, N = 100, 1,000, 5,000 and 10,000 with 30 s
keepalives, the restart storm at 5,000 and 10,000 idle streams.

Interrupted (SIGTERM, SIGINT, SIGHUP, or ``--deadline``), it stops every process it started before it exits.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench import procs, report
from bench.scale import PARTS

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024

QUICK: dict[str, dict[str, Any]] = {
    "sshd": {"nbytes": 128 * MiB, "rounds": 3, "requests": 200, "opens_seq": 200, "opens_conc": 500,
             "concurrency": 100, "tunnels": 8, "parallel_bytes": 32 * MiB},
    "scale": {"ns": [100], "keepalive": 5.0, "idle_window": 10.0, "streams": 1000, "hold": 3.0, "storm_at": 0},
    "dialin": {"nbytes": 64 * MiB, "repeats": 1, "requests": 200},
}
FULL: dict[str, dict[str, Any]] = {
    "sshd": {"nbytes": 1024 * MiB, "rounds": 5, "requests": 2000, "opens_seq": 1000, "opens_conc": 5000,
             "concurrency": 100, "tunnels": 8, "parallel_bytes": 256 * MiB},
    "scale": {"ns": [100, 1000, 5000, 10_000], "keepalive": 30.0, "idle_window": 60.0, "streams": 10_000,
              "hold": 10.0, "storm_at": 5000},
    "dialin": {"nbytes": 1024 * MiB, "repeats": 3, "requests": 2000},
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes, one scale point (N=100): under 3 minutes.")
@click.option("--only", type=click.Choice(["sshd", "scale", "dialin"]), help="Run one part.")
@click.option("--nodes", help="Scale points, comma-separated (overrides the preset), e.g. 100,1000.")
@click.option("--scale-part", "scale_parts", multiple=True, type=click.Choice(PARTS),
              help="Scale: only these measurements after all tunnels are up (repeatable; default all), e.g. "
                   "--only scale --nodes 5000 --scale-part streams.")
@click.option("--cipher", default="aes128-gcm@openssh.com", show_default=True,
              help="The one cipher the sshd allows (so both clients use it).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=HERE, show_default=True,
              help="Where results.json and results.png go.")
@click.option("--note", default="", help="Free text recorded with the results (e.g. other load on the machine).")
@click.option("--deadline", type=float, default=None,
              help="Stop (and stop everything started) after this many seconds, like SIGTERM.")
def main(quick: bool, only: str | None, nodes: str | None, scale_parts: tuple[str, ...], cipher: str, out: Path,
         note: str, deadline: float | None) -> None:
    """Benchmark the gateway against ssh -N -L on the same sshd, and at scale."""
    try:
        import matplotlib  # noqa: F401  # the plot is written at the end: find out now, not after the run
    except ImportError as exc:
        raise click.ClickException(f"matplotlib is missing ({exc}): install the bench extra, "
                                   "pip install -e '.[bench]'") from None
    if os.geteuid() != 0:
        raise click.ClickException("run as root (network namespaces for the sshd, thousands of descriptors)")
    procs.raise_nofile()
    procs.on_interrupt(deadline)
    try:
        _run(quick, only, nodes, scale_parts or PARTS, cipher, out, note)
    except procs.Interrupted as exc:
        _log(f"interrupted by signal {exc.signum}: stopping what was started")
        raise
    finally:
        procs.stop_all()


def _run(quick: bool, only: str | None, nodes: str | None, scale_parts: tuple[str, ...], cipher: str, out: Path,
         note: str) -> None:
    preset = QUICK if quick else FULL
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "python -m bench" + (" --quick" if quick else "") + (f" --only {only}" if only else "")
        + (f" --nodes {nodes}" if nodes else "")
        + "".join(f" --scale-part {p}" for p in scale_parts if scale_parts != PARTS),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**procs.machine_load(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "note": note,
    }
    try:
        import uvloop

        results["machine"]["uvloop"] = uvloop.__version__
    except ImportError:
        results["machine"]["uvloop"] = None
    if only in (None, "sshd"):
        from bench import sshd

        _log("part 1-4: gateway vs ssh -N -L against real sshds")
        results["sshd"] = sshd.run(cipher=cipher, log=_log, **preset["sshd"])  # type: ignore[arg-type]
    if only in (None, "scale"):
        from bench import scale

        params = dict(preset["scale"])
        if nodes:
            params["ns"] = [int(x) for x in nodes.split(",")]
        _log(f"part 4-5: scale, N = {params['ns']}")
        results["scale"] = scale.run(log=_log, parts=scale_parts, **params)  # type: ignore[arg-type]
    if only in (None, "dialin"):
        from bench import dialin

        _log("part 6: dial-in (ssh -N -R from the node) beside dial-out (the gateway dials sshd)")
        results["dialin"] = dialin.run(cipher=cipher, log=_log, **preset["dialin"])
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    signal.alarm(0)
    results["seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json")
    report.plot(results, out / "results.png")
    report.print_tables(results)
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {results['seconds']} s")


if __name__ == "__main__":
    main()
