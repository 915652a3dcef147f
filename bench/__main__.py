"""``python -m bench [--quick]``: the gateway and OpenSSH side by side; prints tables, writes JSON and a PNG.

Needs root (network namespaces and sshd for the comparison, many file descriptors for scale), OpenSSH's ``sshd`` and
``ssh``, and matplotlib (the ``bench`` extra). ``--quick`` (under 3 minutes on 2 cores) uses smaller sizes and one
scale point with short keepalives; the full run is 1 GiB x 3, 2,000 requests per path, N = 100, 1,000, 5,000 with
30 s keepalives and 10,000 idle streams.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench import procs, report

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024

QUICK = {
    "sshd": {"nbytes": 256 * MiB, "repeats": 1, "requests": 300, "opens_seq": 300, "opens_conc": 1000,
             "concurrency": 100},
    "scale": {"ns": [100], "keepalive": 5.0, "idle_window": 10.0, "streams": 1000, "hold": 3.0},
}
FULL = {
    "sshd": {"nbytes": 1024 * MiB, "repeats": 3, "requests": 2000, "opens_seq": 1000, "opens_conc": 5000,
             "concurrency": 100},
    "scale": {"ns": [100, 1000, 5000], "keepalive": 30.0, "idle_window": 60.0, "streams": 10_000, "hold": 10.0},
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes, one scale point (N=100): under 3 minutes.")
@click.option("--only", type=click.Choice(["sshd", "scale"]), help="Run one part.")
@click.option("--nodes", help="Scale points, comma-separated (overrides the preset), e.g. 100,1000.")
@click.option("--cipher", default="aes128-gcm@openssh.com", show_default=True,
              help="The one cipher the sshd allows (so both clients use it).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=HERE, show_default=True,
              help="Where results.json and results.png go.")
@click.option("--note", default="", help="Free text recorded with the results (e.g. other load on the machine).")
def main(quick: bool, only: str | None, nodes: str | None, cipher: str, out: Path, note: str) -> None:
    """Benchmark the gateway against ssh -N -L on the same sshd, and at scale."""
    if os.geteuid() != 0:
        raise click.ClickException("run as root (network namespaces for the sshd, thousands of descriptors)")
    procs.raise_nofile()
    preset = QUICK if quick else FULL
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "python -m bench" + (" --quick" if quick else "") + (f" --only {only}" if only else "")
        + (f" --nodes {nodes}" if nodes else ""),
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

        _log("part 1-3: gateway vs ssh -N -L against one real sshd")
        results["sshd"] = sshd.run(cipher=cipher, log=_log, **preset["sshd"])  # type: ignore[arg-type]
    if only in (None, "scale"):
        from bench import scale

        params = dict(preset["scale"])
        if nodes:
            params["ns"] = [int(x) for x in nodes.split(",")]
        _log(f"part 4-5: scale, N = {params['ns']}")
        results["scale"] = scale.run(log=_log, **params)  # type: ignore[arg-type]
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json")
    report.plot(results, out / "results.png")
    report.print_tables(results)
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {results['seconds']} s")


if __name__ == "__main__":
    main()
