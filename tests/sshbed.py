# SSH test bed: real OpenSSH servers standing in for cluster nodes.
#
# How it works
# ------------
# * An SshBed owns a private work directory holding an SSH CA key pair, a client key pair and a known_hosts
#   file whose only line is "@cert-authority * <CA public key>" -- the single trust root a gateway needs.
# * add_node() simulates one node.  As root ("netns" mode) it creates a network namespace plus a veth pair:
#   the root-namespace end gets 198.18.<i>.1/24, the namespace end (named eth0) gets 198.18.<i>.2/24, and lo
#   is brought up inside the namespace.  <i> is chosen under a machine-wide file lock so that several beds,
#   in one or in several pytest processes, never share a subnet.  Without namespaces ("loopback" mode, e.g.
#   when not root) every node gets its own 127.0.<k>.<i> address and a free port from 2222 upwards.
# * Every node gets an ed25519 host key (a host certificate signed by the bed CA when signed=True, by a
#   throwaway per-node CA otherwise), an authorized_keys file with the client key and an sshd_config.  The
#   real /usr/sbin/sshd runs in the foreground (-D, logging to a file with LogLevel VERBOSE) inside the
#   namespace, next to tests/nodeagent.py, which serves GET /healthz (port 10248) and a TCP echo (7777) on
#   127.0.0.1 inside the namespace -- the targets a gateway reaches *through* the SSH tunnel -- and the same
#   HTTP server (with /stream and /sink for fault tests) on the node's own address, port 8080 (app_port).
# * Every process is started by the bed and stopped by PID (SIGTERM, <= 5 s grace, SIGKILL), together with
#   the per-connection children sshd forked (found through /proc).  Namespaces and veths are deleted on
#   remove_node()/close(); close() is idempotent, runs from __exit__ and, as a safety net, at interpreter exit.
"""Fixture library: one real OpenSSH sshd per simulated node, each in its own network namespace."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import ipaddress
import itertools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
IP = shutil.which("ip") or "/usr/sbin/ip"
AGENT_SCRIPT = Path(__file__).resolve().with_name("nodeagent.py")

HEALTHZ_PORT = 10248
ECHO_PORT = 7777
APP_PORT = 8080
LOOPBACK_FIRST_SSH_PORT = 2222
STARTUP_TIMEOUT = 10.0
STOP_GRACE = 5.0
COMMAND_TIMEOUT = 30.0
# 198.18.0.0/15: subnet index n (1..508) -> 198.18.n.0/24 for n <= 254, else 198.19.(n-254).0/24.
MAX_SUBNET_INDEX = 508
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
IFNAMSIZ_MAX = 15

_BED_COUNTER = itertools.count(1)
_ALLOC_THREAD_LOCK = threading.Lock()
_next_subnet_hint = 1


class SshBedError(RuntimeError):
    """Raised when the bed cannot set something up (the message carries the failing command's output)."""


# --------------------------------------------------------------------------------------------------------
# small helpers: commands, /proc process trees, locking
# --------------------------------------------------------------------------------------------------------


def _run(argv: list[str], *, timeout: float = COMMAND_TIMEOUT, check: bool = True,
         input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded timeout; raise SshBedError with its output if check and it fails."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input_text,
                            check=False)
    except subprocess.TimeoutExpired as exc:
        raise SshBedError(f"command timed out after {timeout}s: {argv}") from exc
    except OSError as exc:
        raise SshBedError(f"cannot run {argv}: {exc}") from exc
    if check and cp.returncode != 0:
        raise SshBedError(f"command failed (rc={cp.returncode}): {' '.join(argv)}\n"
                          f"stdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}")
    return cp


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces/parentheses: the fields we want follow the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    if len(rest) < 2:
        return None
    return rest[0].decode(), int(rest[1])


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def _children_map() -> dict[int, list[int]]:
    """Map ppid -> [pid] over all processes currently visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is not None:
            children.setdefault(st[1], []).append(int(entry))
    return children


def _descendants(root: int) -> set[int]:
    """All (transitive) children of root, found via the PPid field in /proc."""
    children = _children_map()
    found: set[int] = set()
    todo = [root]
    for _ in range(100_000):
        if not todo:
            break
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found and child != root:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    """Send a signal, ignoring processes that are already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _freeze_tree(root: int) -> set[int]:
    """SIGSTOP root and all of its descendants until no new ones appear; return the set of pids.

    sshd forks a child per connection (which calls setsid(), so process groups do not help) and that child
    forks again; stopping the whole tree before signalling it means nothing escapes by forking meanwhile.
    """
    pids: set[int] = set()
    for _ in range(20):
        found = {root} | _descendants(root)
        new = found - pids
        if not new and pids:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        pids |= found
        time.sleep(0.005)
    return pids


def _stop_processes(procs: Iterable[subprocess.Popen[bytes]], *, graceful: bool,
                    extra_pids: Iterable[int] = (), grace: float = STOP_GRACE) -> None:
    """Stop processes we started (and their descendants) by PID.

    graceful: SIGTERM, wait up to `grace` seconds, then SIGKILL what is left.  Otherwise SIGKILL at once.
    Our own Popen children are reaped; descendants reparented elsewhere are only waited for until dead.
    """
    procs = list(procs)
    pids: set[int] = set(extra_pids)
    for proc in procs:
        if proc.poll() is None:
            pids |= _freeze_tree(proc.pid)
    for pid in pids:
        _signal(pid, signal.SIGTERM if graceful else signal.SIGKILL)
    for pid in pids:
        _signal(pid, signal.SIGCONT)
    deadline = time.monotonic() + (grace if graceful else 2.0)
    for _ in range(100_000):
        for proc in procs:
            proc.poll()
        if not any(pid_alive(p) for p in pids) or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for pid in pids:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed processes die
            print(f"sshbed: warning: pid {proc.pid} still not reaped after SIGKILL", file=sys.stderr)


def _lock_dir() -> Path:
    """Directory for the machine-wide lock and prefix claims (per user when not root)."""
    if os.geteuid() == 0 and os.access("/run/lock", os.W_OK):
        return Path("/run/lock")
    path = Path(tempfile.gettempdir()) / f"tunneld-sshbed-uid{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """A machine-wide lock (flock) serialising prefix and subnet allocation between test processes."""
    with _ALLOC_THREAD_LOCK, open(_lock_dir() / "tunneld-sshbed.lock", "a+") as fh:
        deadline = time.monotonic() + 30.0
        for _ in range(100_000):
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SshBedError("timed out waiting for the sshbed allocation lock") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _subnet_for_index(n: int) -> tuple[str, str]:
    """(root-side address, namespace-side address) of subnet index n in 198.18.0.0/15."""
    second, third = (18, n) if n <= 254 else (19, n - 254)
    return f"198.{second}.{third}.1", f"198.{second}.{third}.2"


def _used_benchmark_subnets() -> set[int]:
    """Subnet indices already present on this machine (addresses or routes inside 198.18.0.0/15)."""
    net = ipaddress.ip_network("198.18.0.0/15")
    text = _run([IP, "-o", "-4", "addr", "show"], check=False).stdout
    text += "\n" + _run([IP, "-4", "route", "show", "table", "all"], check=False).stdout
    used: set[int] = set()
    for m in re.finditer(r"\b(198\.1[89]\.\d{1,3}\.\d{1,3})", text):
        try:
            addr = ipaddress.ip_address(m.group(1))
        except ValueError:
            continue
        if addr in net:
            second, third = int(str(addr).split(".")[1]), int(str(addr).split(".")[2])
            used.add(third if second == 18 else third + 254)
    return used


def _port_free(host: str, port: int) -> bool:
    """True if we can bind (host, port) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------------------


class SshNode:
    """One simulated node: a real sshd plus the node agent, in their own namespace (or loopback address)."""

    def __init__(self, bed: SshBed, name: str, index: int, directory: Path, *, address: str, port: int,
                 netns: str | None, host_address: str | None, veth: str | None, signed: bool) -> None:
        """Internal: use SshBed.add_node()."""
        self.bed = bed
        self.name = name
        self.index = index
        self.dir = directory
        self.address = address
        self.port = port
        self.netns = netns
        self.host_address = host_address  # root-namespace end of the veth (netns mode)
        self.veth = veth                  # root-namespace veth name (netns mode)
        self.signed = signed
        self.sshd_pid: int | None = None
        self.agent_pid: int | None = None
        self.log_path = directory / "sshd.log"
        self.stderr_path = directory / "sshd.stderr"
        self.agent_log_path = directory / "agent.stderr"
        self.config_path = directory / "sshd_config"
        self.host_key = directory / "ssh_host_ed25519_key"
        self.host_key_pub = directory / "ssh_host_ed25519_key.pub"
        self.host_cert: Path | None = None
        self.authorized_keys = directory / "authorized_keys"
        self.echo_port = ECHO_PORT
        self.healthz_port = HEALTHZ_PORT
        self.app_port = APP_PORT
        self._sshd: subprocess.Popen[bytes] | None = None
        self._agent: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        """Short description for test output."""
        return (f"SshNode({self.name!r}, {self.address}:{self.port}, netns={self.netns!r}, "
                f"signed={self.signed}, sshd_pid={self.sshd_pid})")

    # -- command helpers -------------------------------------------------------------------------------

    def _ns_argv(self, argv: list[str]) -> list[str]:
        """Prefix argv so that it runs inside the node's namespace (if any)."""
        if self.netns is None:
            return list(argv)
        return [IP, "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], *, timeout: float = COMMAND_TIMEOUT, input_text: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node's namespace (plainly, in loopback mode) with a bounded timeout."""
        return _run(self._ns_argv(argv), timeout=timeout, check=check, input_text=input_text)

    # -- logs ----------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """The sshd log (all incarnations of this node's sshd append to it)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def accepted_logins(self) -> int:
        """Number of 'Accepted publickey' lines in the sshd log."""
        return self.log_text().count("Accepted publickey")

    def _diagnostics(self) -> str:
        """Log excerpts for error messages."""
        parts = [f"--- sshd log ({self.log_path}) ---", self.log_text()[-4000:]]
        for path in (self.stderr_path, self.agent_log_path):
            with contextlib.suppress(OSError):
                parts += [f"--- {path.name} ---", path.read_text(errors="replace")[-2000:]]
        return "\n".join(parts)

    # -- sshd --------------------------------------------------------------------------------------------

    def sshd_running(self) -> bool:
        """True if this node's sshd listener process is alive."""
        return self._sshd is not None and self._sshd.poll() is None

    def start_sshd(self) -> None:
        """Start sshd (same config and keys) and wait until its port answers with an SSH banner."""
        if self.sshd_running():
            return
        argv = self._ns_argv([SSHD, "-D", "-E", str(self.log_path), "-f", str(self.config_path)])
        with open(self.stderr_path, "ab") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True, close_fds=True)
        self._sshd = proc
        self.sshd_pid = proc.pid
        self.bed._register(proc)
        self._wait_sshd_ready(proc)

    def _wait_sshd_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Poll (bounded) until (address, port) accepts a TCP connection and sends an SSH banner."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last_error = "no attempt"
        for _ in range(10_000):
            if proc.poll() is not None:
                raise SshBedError(f"sshd of node {self.name} exited with rc={proc.returncode} during "
                                  f"startup\n{self._diagnostics()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1.0) as s:
                    s.settimeout(2.0)
                    banner = s.recv(256)
                if banner.startswith(b"SSH-"):
                    return
                last_error = f"unexpected banner {banner!r}"
            except OSError as exc:
                last_error = repr(exc)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise SshBedError(f"sshd of node {self.name} not reachable at {self.address}:{self.port} within "
                          f"{STARTUP_TIMEOUT}s ({last_error})\n{self._diagnostics()}")

    def kill_sshd(self) -> None:
        """SIGKILL the sshd listener and every per-connection child, so clients' connections really drop."""
        if self._sshd is not None:
            _stop_processes([self._sshd], graceful=False)
        self._sshd = None
        self.sshd_pid = None

    def replace_host_key(self, *, signed: bool) -> None:
        """Give the node a new host key (certified by the bed CA when signed, else by a throwaway CA), restart sshd.

        With signed=False this is a man in the middle as the gateway sees it: same address, untrusted key.
        """
        self.kill_sshd()
        for path in (self.host_key, self.host_key_pub, self.dir / "ssh_host_ed25519_key-cert.pub"):
            path.unlink(missing_ok=True)
        ca = self.bed.ca_key
        if not signed:
            ca = self.dir / "throwaway_ca"
            if not ca.exists():
                _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "sshbed-untrusted-ca", "-f", str(ca)])
        _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", f"host-{self.name}", "-f", str(self.host_key)])
        _run([SSH_KEYGEN, "-q", "-s", str(ca), "-h", "-I", self.name, "-n", f"{self.name},{self.address}",
              "-V", "-5m:+1d", str(self.host_key_pub)])
        self.signed = signed
        self.start_sshd()

    # -- agent -------------------------------------------------------------------------------------------

    def _start_agent(self) -> subprocess.Popen[bytes]:
        """Launch the node agent (readiness is awaited separately by _wait_agent_ready)."""
        host = "127.0.0.1" if self.netns is not None else self.address
        argv = [sys.executable, "-I", "-u", str(AGENT_SCRIPT), "--host", host,
                "--healthz-port", str(HEALTHZ_PORT), "--echo-port", str(ECHO_PORT),
                "--app-host", self.address, "--app-port", str(APP_PORT)]
        if self.netns is None:
            argv.append("--fallback-ephemeral")  # loopback mode: ports might be taken by someone else
        with open(self.agent_log_path, "ab") as err:
            proc = subprocess.Popen(self._ns_argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True, close_fds=True)
        self._agent = proc
        self.agent_pid = proc.pid
        self.bed._register(proc)
        return proc

    def _wait_agent_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait (bounded) for the agent's 'READY healthz=<port> echo=<port>' line."""
        assert proc.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        buf = b""
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                m = re.search(rb"READY healthz=(\d+) echo=(\d+)(?: app=(\d+))?\n", buf)
                if m:
                    self.healthz_port, self.echo_port = int(m.group(1)), int(m.group(2))
                    if m.group(3):
                        self.app_port = int(m.group(3))
                    return
            elif proc.poll() is not None:
                break
        raise SshBedError(f"node agent of {self.name} did not become ready (rc={proc.poll()}, "
                          f"output={buf!r})\n{self._diagnostics()}")

    # -- lifecycle -------------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        """Stop sshd (+ children) and the agent gracefully; in netns mode also sweep the namespace."""
        procs = [p for p in (self._sshd, self._agent) if p is not None]
        extra: list[int] = []
        if self.netns is not None:
            cp = _run([IP, "netns", "pids", self.netns], check=False, timeout=10.0)
            extra = [int(x) for x in cp.stdout.split() if x.isdigit()]
        _stop_processes(procs, graceful=True, extra_pids=extra)
        for proc in procs:
            if proc.stdout is not None:
                proc.stdout.close()
        self._sshd = self._agent = None
        self.sshd_pid = self.agent_pid = None


# --------------------------------------------------------------------------------------------------------
# the bed
# --------------------------------------------------------------------------------------------------------


class SshBed:
    """A set of simulated nodes, each running a real OpenSSH sshd, trusted through one SSH CA."""

    def __init__(self, workdir: Path, *, mode: str = "auto") -> None:
        """Create the CA, the client key and known_hosts in workdir (a private 0700 directory).

        mode: "auto" (netns when possible, else loopback), or force "netns" / "loopback".
        """
        if mode not in ("auto", "netns", "loopback"):
            raise ValueError(f"mode must be auto, netns or loopback, not {mode!r}")
        if not os.access(SSHD, os.X_OK):
            raise SshBedError(f"{SSHD} not found; install openssh-server")
        self._owner_pid = os.getpid()
        self._closed = False
        self._procs: list[subprocess.Popen[bytes]] = []
        self.started_pids: list[int] = []
        self._namespaces: list[str] = []  # created and not yet deleted
        self._links: list[str] = []       # root-side veths created and not yet deleted
        self._node_counter = itertools.count(1)
        self.nodes: dict[str, SshNode] = {}

        self.workdir = Path(workdir)
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.is_root = os.geteuid() == 0
        self.user = "root" if self.is_root else getpass.getuser()

        bed_no = next(_BED_COUNTER)
        pid_part = os.getpid() % 100000
        self.prefix, self._claim = self._claim_prefix(pid_part, bed_no)
        self.mode = self._detect_mode(mode)
        self.node_local_host = "127.0.0.1" if self.mode == "netns" else "@node"
        self._loopback_k = 1 + (os.getpid() + bed_no * 37) % 250

        self.ca_key = self.workdir / "ca" / "ssh_ca"
        self.client_key = self.workdir / "client" / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        for key, comment in ((self.ca_key, "sshbed-ca"), (self.client_key, "sshbed-client")):
            key.parent.mkdir(mode=0o700, exist_ok=True)
            _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
            os.chmod(key, 0o600)
        self.ca_public_key = Path(f"{self.ca_key}.pub").read_text().strip()
        self.client_public_key = Path(f"{self.client_key}.pub").read_text().strip()
        self.known_hosts.write_text(f"@cert-authority * {self.ca_public_key}\n")
        if self.is_root:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        atexit.register(self.close)

    # -- setup helpers -------------------------------------------------------------------------------

    @staticmethod
    def _claim_prefix(pid_part: int, bed_no: int) -> tuple[str, Path]:
        """Claim 'td<pid%100000>b<n>-' machine-wide (a claim file holding our PID) and return it.

        Prefixes claimed by live processes, or still used by namespaces/links left over by a crashed run,
        are skipped; this also keeps two copies of this module in one process (imported under different
        names) from colliding.
        """
        claims = _lock_dir() / "tunneld-sshbed.d"
        with _machine_lock():
            claims.mkdir(mode=0o755, exist_ok=True)
            existing = ""
            if os.path.isdir("/run/netns"):
                existing = "\n".join(os.listdir("/run/netns"))
            with contextlib.suppress(OSError):
                existing += "\n" + "\n".join(os.listdir("/sys/class/net"))
            for n in range(bed_no, bed_no + 1000):
                prefix = f"td{pid_part}b{n}-"
                claim = claims / prefix
                with contextlib.suppress(OSError, ValueError):
                    if pid_alive(int(claim.read_text().strip() or "0")):
                        continue
                if prefix in existing:
                    continue
                claim.write_text(f"{os.getpid()}\n")
                return prefix, claim
        raise SshBedError("cannot find an unused namespace prefix")

    def _detect_mode(self, requested: str) -> str:
        """Decide between netns and loopback mode (printing a clear line when falling back)."""
        if requested == "loopback":
            print("sshbed: loopback mode requested; using loopback addresses instead of network namespaces")
            return "loopback"
        reason = ""
        if not self.is_root:
            reason = "not running as root"
        elif not os.access(IP, os.X_OK):
            reason = "the ip command is missing"
        else:
            probe = f"{self.prefix}probe"
            cp = _run([IP, "netns", "add", probe], check=False)
            if cp.returncode == 0:
                _run([IP, "netns", "del", probe], check=False)
                return "netns"
            reason = f"'ip netns add' failed: {cp.stderr.strip() or cp.returncode}"
        if requested == "netns":
            raise SshBedError(f"network namespaces unavailable ({reason})")
        print(f"sshbed: network namespaces unavailable ({reason}); falling back to loopback addresses")
        return "loopback"

    def _register(self, proc: subprocess.Popen[bytes]) -> None:
        """Remember a started process so close() can stop it."""
        self._procs.append(proc)
        self.started_pids.append(proc.pid)

    def _check_open(self) -> None:
        """Raise if the bed has been closed."""
        if self._closed:
            raise SshBedError("this SshBed is closed")

    def _create_netns_node_network(self, k: int) -> tuple[str, str, str, str]:
        """Create namespace + veth for node number k; returns (netns, veth, host_addr, node_addr)."""
        global _next_subnet_hint
        netns = f"{self.prefix}n{k}"
        veth = f"{self.prefix}h{k}"
        if len(veth) > IFNAMSIZ_MAX:
            raise SshBedError(f"interface name {veth!r} too long (more than {IFNAMSIZ_MAX} characters)")
        with _machine_lock():
            used = _used_benchmark_subnets()
            start = _next_subnet_hint
            candidates = [((start - 1 + j) % MAX_SUBNET_INDEX) + 1 for j in range(MAX_SUBNET_INDEX)]
            free = next((n for n in candidates if n not in used), None)
            if free is None:
                raise SshBedError("no free /24 left in 198.18.0.0/15")
            _next_subnet_hint = free % MAX_SUBNET_INDEX + 1
            host_addr, node_addr = _subnet_for_index(free)
            _run([IP, "netns", "add", netns])
            self._namespaces.append(netns)
            _run([IP, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
            self._links.append(veth)
            _run([IP, "addr", "add", f"{host_addr}/24", "dev", veth])
            _run([IP, "link", "set", veth, "up"])
        _run([IP, "-n", netns, "addr", "add", f"{node_addr}/24", "dev", "eth0"])
        _run([IP, "-n", netns, "link", "set", "eth0", "up"])
        _run([IP, "-n", netns, "link", "set", "lo", "up"])
        return netns, veth, host_addr, node_addr

    def _loopback_port(self, address: str) -> int:
        """First free port >= 2222 on address."""
        for port in range(LOOPBACK_FIRST_SSH_PORT, LOOPBACK_FIRST_SSH_PORT + 2000):
            if _port_free(address, port):
                return port
        raise SshBedError(f"no free port for sshd on {address}")

    def _write_keys(self, node: SshNode, signed: bool) -> None:
        """Host key, host certificate (bed CA or a throwaway CA), authorized_keys."""
        _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", f"host-{node.name}", "-f", str(node.host_key)])
        if signed:
            ca = self.ca_key
        else:
            ca = node.dir / "throwaway_ca"
            _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "sshbed-untrusted-ca", "-f", str(ca)])
        _run([SSH_KEYGEN, "-q", "-s", str(ca), "-h", "-I", node.name, "-n", f"{node.name},{node.address}",
              "-V", "-5m:+1d", str(node.host_key_pub)])
        node.host_cert = node.dir / "ssh_host_ed25519_key-cert.pub"
        node.authorized_keys.write_text(self.client_public_key + "\n")

    def _write_sshd_config(self, node: SshNode, extra: str) -> None:
        """Write sshd_config; extra settings go first (sshd keeps the first value), Match blocks last."""
        extra_lines = extra.strip("\n").splitlines()
        match_at = next((i for i, line in enumerate(extra_lines)
                         if line.strip().lower().startswith("match ")), len(extra_lines))
        head, tail = extra_lines[:match_at], extra_lines[match_at:]
        lines = [f"# generated by tests/sshbed.py for node {node.name}", *head,
                 f"Port {node.port}",
                 f"ListenAddress {node.address}",
                 f"HostKey {node.host_key}"]
        if node.host_cert is not None:
            lines.append(f"HostCertificate {node.host_cert}")
        lines += [
            f"AuthorizedKeysFile {node.authorized_keys}",
            "AuthorizedPrincipalsFile none",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "PidFile none",
            "LogLevel VERBOSE",
            "MaxStartups 100:30:200",
            "ClientAliveInterval 0",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LoginGraceTime 30",
            *tail,
        ]
        node.config_path.write_text("\n".join(lines) + "\n")
        cp = _run([SSHD, "-t", "-f", str(node.config_path)], check=False)
        if cp.returncode != 0:
            raise SshBedError(f"sshd rejected the config of node {node.name} ({node.config_path}):\n"
                              f"{cp.stderr.strip()}\n{cp.stdout.strip()}\n--- config ---\n"
                              f"{node.config_path.read_text()}")

    # -- public API ----------------------------------------------------------------------------------

    def add_node(self, name: str, *, signed: bool = True, extra_sshd_config: str = "") -> SshNode:
        """Create a node with its own address, keys and config; start sshd and the agent; wait until ready.

        signed=False gives the node a host certificate from a throwaway CA instead of the bed CA (sshd also
        offers the plain host key), so a client trusting only the bed CA must refuse it.
        extra_sshd_config is placed before the defaults (sshd uses the first value it sees, so it
        overrides them); a trailing "Match" block is kept at the end.
        """
        self._check_open()
        if not NODE_NAME_RE.match(name):
            raise ValueError(f"invalid node name {name!r} (letters, digits, '.', '_', '-')")
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists already")
        k = next(self._node_counter)
        directory = self.workdir / "nodes" / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(mode=0o700, parents=True)
        netns = veth = host_addr = None
        if self.mode == "netns":
            try:
                netns, veth, host_addr, address = self._create_netns_node_network(k)
            except BaseException:
                self._delete_network(f"{self.prefix}n{k}", f"{self.prefix}h{k}")
                raise
            port = 22
        else:
            if k > 254:
                raise SshBedError("at most 254 nodes per bed in loopback mode")
            address = f"127.0.{self._loopback_k}.{k}"
            port = self._loopback_port(address)
        node = SshNode(self, name, k, directory, address=address, port=port, netns=netns,
                       host_address=host_addr, veth=veth, signed=signed)
        self.nodes[name] = node
        try:
            self._write_keys(node, signed)
            self._write_sshd_config(node, extra_sshd_config)
            agent = node._start_agent()
            self._start_sshd_with_port_retry(node, extra_sshd_config)
            node._wait_agent_ready(agent)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove_node(name)
            raise
        return node

    def _start_sshd_with_port_retry(self, node: SshNode, extra: str) -> None:
        """Start sshd; in loopback mode retry on another port if someone grabbed ours meanwhile."""
        for attempt in range(5):
            try:
                node.start_sshd()
                return
            except SshBedError:
                if self.mode == "netns" or attempt == 4 or "Address already in use" not in node.log_text():
                    raise
                node.kill_sshd()
                node.log_path.unlink(missing_ok=True)
                node.port = self._loopback_port(node.address)
                self._write_sshd_config(node, extra)

    def remove_node(self, name: str) -> None:
        """Stop the node's processes and delete its namespace and veth."""
        node = self.nodes.pop(name)
        try:
            node._stop_all()
        finally:
            if node.netns is not None:
                self._delete_network(node.netns, node.veth)

    def _delete_network(self, netns: str | None, veth: str | None) -> None:
        """Delete a veth (both ends) and a namespace if we created them."""
        if veth is not None and veth in self._links:
            cp = _run([IP, "link", "del", veth], check=False, timeout=10.0)
            if cp.returncode == 0 or "Cannot find device" in cp.stderr or "does not exist" in cp.stderr:
                self._links.remove(veth)
        if netns is not None and netns in self._namespaces:
            cp = _run([IP, "netns", "del", netns], check=False, timeout=10.0)
            if cp.returncode == 0 or not os.path.exists(f"/run/netns/{netns}"):
                self._namespaces.remove(netns)

    def close(self) -> None:
        """Stop every started process, delete every namespace and veth.  Idempotent."""
        if self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        errors: list[str] = []
        for name in list(self.nodes):
            try:
                self.remove_node(name)
            except Exception as exc:
                errors.append(f"removing node {name}: {exc!r}")
        try:
            _stop_processes([p for p in self._procs if p.poll() is None], graceful=True)
        except Exception as exc:
            errors.append(f"stopping processes: {exc!r}")
        for proc in self._procs:
            if proc.stdout is not None:
                proc.stdout.close()
        for veth in list(self._links):
            self._delete_network(None, veth)
        for netns in list(self._namespaces):
            self._delete_network(netns, None)
        if self._links or self._namespaces:
            errors.append(f"could not delete links {self._links} / namespaces {self._namespaces}")
        else:
            self._claim.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if errors:
            raise SshBedError("sshbed cleanup problems: " + "; ".join(errors))

    def __enter__(self) -> SshBed:
        """Context manager: returns the bed."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Context manager: close the bed."""
        self.close()

    def __repr__(self) -> str:
        """Short description for test output."""
        return f"SshBed(mode={self.mode!r}, prefix={self.prefix!r}, nodes={list(self.nodes)})"
