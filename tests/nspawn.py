"""A real systemd for tests: a Debian tree booted with ``systemd-nspawn``, the project installed offline inside.

The tree is made once with ``debootstrap`` from the Debian mirror this machine's apt sources use and cached under
``/var/cache/tunneld-test/`` (about 70 s and 350 MB the first time); every boot mounts it read-only with a tmpfs
overlay on top (``--volatile=overlay``), so a test never changes the cache. The container has no network but its own
loopback (``--private-network``): the wheels of the project and its dependencies are built outside and installed
from a read-only bind mount. Commands run inside with ``nsenter`` into the container's PID 1; unix sockets inside are
reached from the host through ``/proc/<pid>/root``. Only processes this module started are stopped, by PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path("/var/cache/tunneld-test")
TREE = CACHE / "bookworm"
WHEELS = CACHE / "wheels"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-pip,openssh-client,openssh-server,curl,iproute2"
SOURCE = ("tunneld", "proxy", "certs", "netnames", "pyproject.toml", "README.md")


class NspawnError(Exception):
    """The container could not be made, booted or driven."""


def missing_tools() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container debootstrap util-linux)"
    return None


def _mirror() -> tuple[str, str]:
    """(mirror URL, suite) of this machine's Debian apt source."""
    suite = "bookworm"
    with contextlib.suppress(OSError):
        found = re.search(r"^VERSION_CODENAME=(\w+)", Path("/etc/os-release").read_text(), re.M)
        suite = found.group(1) if found else suite
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    for text in texts:
        for url in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?\s", text, re.M):
            return url, suite
    raise NspawnError("no Debian mirror in /etc/apt/sources.list*")


def ensure_tree(timeout: float = 600.0) -> Path:
    """The cached Debian tree, made with debootstrap if it is not there yet (one maker at a time)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (TREE / "usr/bin/python3").exists() and (TREE / "usr/sbin/sshd").exists():
            return TREE
        partial = CACHE / "bookworm.partial"
        shutil.rmtree(partial, ignore_errors=True)
        mirror, suite = _mirror()
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", suite, str(partial),
                               mirror], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise NspawnError(f"debootstrap failed: {proc.stderr.strip()[-500:] or proc.stdout.strip()[-500:]}")
        partial.rename(TREE)
    return TREE


def build_wheels(out: Path) -> Path:
    """The project's wheel in ``out`` (built from a copy of the source, so the tree gets no build files), and its
    dependencies' wheels in the cache; returns the project's wheel."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    WHEELS.mkdir(parents=True, exist_ok=True)
    own = out / "own"
    for args in (["--no-deps", "--wheel-dir", str(own), str(src)],
                 ["--wheel-dir", str(WHEELS), "--find-links", str(WHEELS), str(src)]):
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", *args],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise NspawnError(f"pip wheel failed: {proc.stderr.strip()[-800:]}")
    (WHEELS / next(own.glob("tunneld-*.whl")).name).unlink(missing_ok=True)  # only the fresh one is installed
    return next(own.glob("tunneld-*.whl"))


class Container:
    """One booted container; ``run`` executes a command inside it."""

    def __init__(self, name: str, binds: dict[Path, str]) -> None:
        self.name = name
        self.binds = binds
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.log = Path(f"/tmp/{name}.console")

    def boot(self, timeout: float = 90.0) -> None:
        args = ["systemd-nspawn", "-D", str(TREE), "--volatile=overlay", "-b", "--register=no", "--keep-unit",
                "--private-network", "-M", self.name, "--console=read-only"]
        args += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.log, "wb") as console:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.pid1:
            self.pid1 = self._child_of(self.proc.pid)
            self._check_alive(deadline, "to start")
            time.sleep(0.1)
        while True:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            self._check_alive(deadline, f"to boot (system is {state or 'starting'})")
            time.sleep(0.2)

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise NspawnError(f"systemd-nspawn exited ({self.proc.returncode}): {self.console_tail()}")
        if time.monotonic() > deadline:
            raise NspawnError(f"the container took too long {what}: {self.console_tail()}")

    @staticmethod
    def _child_of(pid: int) -> int:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                return int(child)
        return 0

    def console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:]
        return ""

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (all its namespaces), as root."""
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", *argv], capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise NspawnError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()[-800:]}")
        return proc

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def path(self, inside: str) -> Path:
        """A path inside the container as the host sees it (for unix sockets and files)."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        self.run(["sh", "-ec", f'cat > "{inside}" && chmod {mode:o} "{inside}"'], input=text)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power off, then make sure nspawn (started by us, by PID) is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid1:
            with contextlib.suppress(Exception):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def booted(name: str, binds: dict[Path, str]) -> Iterator[Container]:
    container = Container(name, binds)
    try:
        container.boot()
        yield container
    finally:
        container.shutdown()
