"""Kubelet-style TLS bootstrap and rotation of a node's client certificate.

How it works
------------
* **Check.** The node kubeconfig's user points at ``<cert-dir>/kubelet-client-current.pem`` (certificate + key). If it
  holds a certificate that is currently valid, nothing is done (``--rotate``: unless its renewal time has come).
* **Request.** Otherwise a fresh ECDSA P-256 key is generated and written (:mod:`certs.pending`) before a CSR
  named after it (CN ``system:node:<name>``, O ``system:nodes``, no SANs) is POSTed for signer
  ``kubernetes.io/kube-apiserver-client-kubelet`` with usages ``digital signature`` + ``client auth``; a run after
  one that gave up reuses the key, finds its CSR (409) and waits on it. The caller is the bootstrap token of the
  bootstrap kubeconfig, or, when renewing a still-valid certificate, that certificate itself (mutual TLS).
* **Wait.** The CSR is polled until it carries a certificate, or a ``Denied``/``Failed`` condition, or the timeout
  passes; progress lines are reported while waiting.
* **Write.** The issued certificate must carry our public key and be signed by the cluster CA. Certificate and key
  go into a timestamped file (0600, atomic) and the ``kubelet-client-current.pem`` symlink is switched to it
  atomically; then the kubeconfig (server, CA, the symlink as client certificate and key) is written atomically.
* **Rotate.** With ``--rotate`` the process stays up and renews at a random point between 70 % and 90 % of the
  certificate's lifetime (like the kubelet), retrying with capped backoff while the current one is still valid,
  until told to stop. The scheduling arithmetic is the pure function :func:`renewal_time`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs.apiclient import APIClient, APIError, APIUnavailable, tls_context
from certs.files import write_secret
from certs.kubeconfig import KubeConfig, KubeconfigError, with_client_cert
from certs.pending import csr_name, forget_pending, pending_key

SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
USAGES = ["digital signature", "client auth"]
CURRENT = "kubelet-client-current.pem"
PREFIX = "kubelet-client-"
RENEW_MIN, RENEW_MAX = 0.7, 0.9
KEEP_OLD = 2  # timestamped credential files kept besides the current one
MAX_SLEEP = 3600.0  # re-read the wall clock at least hourly while waiting for the renewal time

Progress = Callable[[str], None]


class BootstrapError(Exception):
    """Bootstrap could not obtain a certificate."""


class CSRDenied(BootstrapError):
    """An approver denied the request."""


class CSRFailed(BootstrapError):
    """The signer refused the request (it broke the signer's rules)."""


class BootstrapTimeout(BootstrapError):
    """No decision or certificate within the timeout."""


@dataclass(frozen=True)
class Options:
    """Where things are and how long to wait."""

    bootstrap_kubeconfig: Path
    kubeconfig: Path
    cert_dir: Path
    node_name: str
    timeout: float = 300.0
    poll_interval: float = 1.0
    expiration_seconds: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What a bootstrap run did."""

    issued: bool
    certificate: x509.Certificate
    path: Path
    csr_name: str | None = None

    @property
    def not_after(self) -> dt.datetime:
        """End of validity (UTC)."""
        return self.certificate.not_valid_after_utc


# -- pure helpers ----------------------------------------------------------------------------------------------


def renewal_time(not_before: float, not_after: float, rng: random.Random) -> float:
    """When to renew: a uniformly random point between 70 % and 90 % of the lifetime (epoch seconds)."""
    return not_before + (not_after - not_before) * rng.uniform(RENEW_MIN, RENEW_MAX)


def lifetime(cert: x509.Certificate) -> tuple[float, float]:
    """``(not_before, not_after)`` in epoch seconds."""
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def is_valid(cert: x509.Certificate, now: float) -> bool:
    """True while ``now`` lies inside the certificate's validity period."""
    start, end = lifetime(cert)
    return start <= now < end


def generate_request(node_name: str, key: ec.EllipticCurvePrivateKey | None = None
                     ) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """``key`` (default: a new P-256 key) and the PEM CSR of ``system:node:<node_name>`` in group ``system:nodes``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node_name}"),
    ])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def check_issued(
    cert_pem: bytes, key: ec.EllipticCurvePrivateKey, ca_pem: bytes, node_name: str
) -> x509.Certificate:
    """The issued certificate, after checking it carries our key and name and is signed by the cluster CA."""
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError) as exc:
        raise BootstrapError(f"the issued certificate is not PEM: {exc}") from exc
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
            serialization.Encoding.DER, pub):
        raise BootstrapError("the issued certificate is for another key")
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [f"system:node:{node_name}"]:
        raise BootstrapError(f"the issued certificate names {cns}, not system:node:{node_name}")
    for ca in x509.load_pem_x509_certificates(ca_pem):
        try:
            cert.verify_directly_issued_by(ca)
            return cert
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise BootstrapError("the issued certificate is not signed by the cluster CA")


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The condition of type ``kind`` in a CSR object's status, if any."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == kind and c.get("status", "True") == "True":
            return c
    return None


# -- files ----------------------------------------------------------------------------------------------------


def current_certificate(kubeconfig: Path) -> tuple[x509.Certificate, KubeConfig] | None:
    """The client certificate the node kubeconfig uses, if the kubeconfig and the certificate are readable."""
    if not kubeconfig.exists():
        return None
    try:
        cfg = KubeConfig.load(kubeconfig)
        _, user = cfg.current()
        if user is None:
            return None
        if user.client_certificate_data:
            data = user.client_certificate_data
        elif user.client_certificate:
            data = cfg.resolve(user.client_certificate).read_bytes()
        else:
            return None
        return x509.load_pem_x509_certificates(data)[0], cfg
    except (KubeconfigError, OSError, ValueError, IndexError):
        return None


def write_credentials(cert_dir: Path, cert_pem: bytes, key: ec.EllipticCurvePrivateKey, now: float) -> Path:
    """Write certificate + key to a new timestamped file (0600) and point ``kubelet-client-current.pem`` at it."""
    cert_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(now))
    target = cert_dir / f"{PREFIX}{stamp}.pem"
    for n in range(1, 100):
        if not target.exists():
            break
        target = cert_dir / f"{PREFIX}{stamp}-{n}.pem"
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    write_secret(target, cert_pem.rstrip(b"\n") + b"\n" + key_pem)
    current = cert_dir / CURRENT
    tmp = cert_dir / f".{CURRENT}.{secrets.token_hex(6)}"
    os.symlink(target.name, tmp)
    try:
        os.replace(tmp, current)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(cert_dir)
    _prune(cert_dir, keep={target.name})
    return current


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(cert_dir: Path, keep: set[str]) -> None:
    old = sorted(p for p in cert_dir.glob(f"{PREFIX}*.pem") if p.name != CURRENT and p.name not in keep)
    for p in old[: max(0, len(old) - KEEP_OLD)]:
        p.unlink(missing_ok=True)


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, credentials: Path) -> None:
    """The node kubeconfig: the cluster with its CA, and the credentials file as client certificate and key."""
    cfg = with_client_cert(server, ca_pem, credentials, credentials)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(path, cfg.dumps().encode())


# -- the flow -------------------------------------------------------------------------------------------------


async def request_certificate(
    api: APIClient, node_name: str, opts: Options, ca_pem: bytes, progress: Progress,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[x509.Certificate, bytes, ec.EllipticCurvePrivateKey, str]:
    """Submit a CSR for ``node_name`` through ``api`` and wait for the certificate (or a refusal, or the timeout)."""
    try:
        return await _request(api, node_name, opts, ca_pem, progress, clock)
    except (CSRDenied, CSRFailed):
        forget_pending(opts.cert_dir)  # refused for good: the next request starts with a new key
        raise


async def _request(
    api: APIClient, node_name: str, opts: Options, ca_pem: bytes, progress: Progress, clock: Callable[[], float],
) -> tuple[x509.Certificate, bytes, ec.EllipticCurvePrivateKey, str]:
    key, csr_pem = generate_request(node_name, pending_key(opts.cert_dir))
    name = csr_name(key)
    start = clock()
    try:
        created = await api.create_csr(csr_pem, SIGNER, USAGES, expiration_seconds=opts.expiration_seconds,
                                       name=name)
    except APIError as exc:
        if exc.code >= 500:
            raise BootstrapError(f"the API server could not take the CSR now: {exc}") from exc
        if exc.code != 409:
            raise CSRFailed(f"the API server refused the CSR: {exc}") from exc
        progress(f"certificate signing request {name} exists (an earlier attempt); waiting on it")
        try:
            created = await api.get_csr(name)
        except (APIError, APIUnavailable) as again:
            raise BootstrapError(f"reading the earlier CSR {name}: {again}") from again
    except APIUnavailable as exc:
        raise BootstrapError(f"cannot submit the CSR: {exc}") from exc
    progress(f"submitted certificate signing request {name} for system:node:{node_name} (signer {SIGNER})")
    obj = created
    announced_approval = False
    last_report = start
    unreachable_since: float | None = None
    for _ in range(1_000_000):
        denied, failed = condition(obj, "Denied"), condition(obj, "Failed")
        if denied:
            raise CSRDenied(f"CSR {name} was denied: {_why(denied)}")
        if failed:
            raise CSRFailed(f"CSR {name} failed: {_why(failed)}")
        approved = condition(obj, "Approved")
        if approved and not announced_approval:
            progress(f"CSR {name} approved ({_why(approved)}); waiting for the certificate")
            announced_approval = True
        issued = (obj.get("status") or {}).get("certificate")
        if issued:
            try:
                cert_pem = base64.b64decode(issued, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BootstrapError(f"CSR {name}: status.certificate is not base64") from exc
            cert = check_issued(cert_pem, key, ca_pem, node_name)
            return cert, cert_pem, key, name
        elapsed = clock() - start
        if elapsed >= opts.timeout:
            state = "approved but not yet signed" if approved else "still pending approval"
            raise BootstrapTimeout(f"CSR {name} {state} after {opts.timeout:g}s; giving up (it stays in the queue)")
        if clock() - last_report >= 5.0:
            last_report = clock()
            what = "the certificate" if approved else "approval"
            progress(f"waiting for {what} of CSR {name} ({elapsed:.0f}s of {opts.timeout:g}s)")
        await asyncio.sleep(min(opts.poll_interval, max(0.0, opts.timeout - elapsed)))
        try:
            obj = await api.get_csr(name)
            unreachable_since = None
        except APIUnavailable as exc:
            if unreachable_since is None or clock() - last_report >= 5.0:
                last_report = clock()
                progress(f"polling CSR {name}: {exc}; retrying")
            unreachable_since = unreachable_since or clock()
        except APIError as exc:
            raise BootstrapError(f"polling CSR {name}: {exc}") from exc
    raise BootstrapTimeout(f"CSR {name}: too many polls")  # pragma: no cover - bounded by the timeout above


def _why(c: dict[str, Any]) -> str:
    reason, message = str(c.get("reason") or ""), str(c.get("message") or "")
    return ": ".join(x for x in (reason, message) if x) or "no reason given"


def _bootstrap_source(opts: Options) -> tuple[str, bytes, str]:
    try:
        cfg = KubeConfig.load(opts.bootstrap_kubeconfig)
        cluster, user = cfg.current()
        ca_pem = cfg.ca_pem(cluster)
    except KubeconfigError as exc:
        raise BootstrapError(f"bootstrap kubeconfig: {exc}") from exc
    if user is None or not user.token:
        raise BootstrapError(f"{opts.bootstrap_kubeconfig}: the current user has no token")
    if not ca_pem:
        raise BootstrapError(f"{opts.bootstrap_kubeconfig}: the cluster has no CA; refusing to talk to it unverified")
    return cluster.server, ca_pem, user.token


async def obtain(opts: Options, progress: Progress, *, renew: bool = False, now: float | None = None) -> Outcome:
    """Make sure the node has a valid client certificate; with ``renew``, get a new one even if it has.

    A still-valid certificate authenticates its own renewal; otherwise the bootstrap kubeconfig's token is used.
    """
    now = time.time() if now is None else now
    current = current_certificate(opts.kubeconfig)
    if current is not None and is_valid(current[0], now) and not renew:
        return Outcome(False, current[0], opts.cert_dir / CURRENT)
    if current is not None and is_valid(current[0], now):
        cfg = current[1]
        cluster, user = cfg.current()
        ca_pem = cfg.ca_pem(cluster)
        assert user is not None
        if not ca_pem or not (user.client_certificate and user.client_key):
            raise BootstrapError(f"{opts.kubeconfig}: needs a CA and client certificate/key files to renew")
        server = cluster.server
        context = tls_context(ca_pem, cfg.resolve(user.client_certificate), cfg.resolve(user.client_key))
        token = None
        progress(f"renewing the client certificate of system:node:{opts.node_name} (authenticating with it)")
    else:
        if current is not None:
            progress(f"the client certificate in {opts.kubeconfig} is not valid now "
                     f"(valid {current[0].not_valid_before_utc:%Y-%m-%d %H:%M} to "
                     f"{current[0].not_valid_after_utc:%Y-%m-%d %H:%M} UTC); bootstrapping")
        else:
            progress(f"no usable client certificate in {opts.kubeconfig}; bootstrapping with "
                     f"{opts.bootstrap_kubeconfig}")
        server, ca_pem, token = _bootstrap_source(opts)
        context = tls_context(ca_pem)
    try:
        async with APIClient(server, context, token=token) as api:
            cert, cert_pem, key, name = await request_certificate(api, opts.node_name, opts, ca_pem, progress)
    except ValueError as exc:  # a malformed server URL
        raise BootstrapError(str(exc)) from exc
    credentials = write_credentials(opts.cert_dir, cert_pem, key, time.time())
    write_kubeconfig(opts.kubeconfig, server, ca_pem, credentials)
    forget_pending(opts.cert_dir)
    progress(f"certificate for system:node:{opts.node_name} written to {credentials} (serial "
             f"{cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC); kubeconfig "
             f"{opts.kubeconfig}")
    return Outcome(True, cert, credentials, name)


Sleep = Callable[[float], Awaitable[bool]]


def event_sleep(stop: asyncio.Event) -> Sleep:
    """A sleep that ends early, returning True, when ``stop`` is set."""
    async def sleep(seconds: float) -> bool:
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            return stop.is_set()
        return True
    return sleep


async def rotate(
    opts: Options, progress: Progress, sleep: Sleep, *, clock: Callable[[], float] = time.time,
    rng: random.Random | None = None, max_renewals: int = 1_000_000, retry_initial: float = 5.0,
    retry_max: float = 300.0,
) -> int:
    """Keep the certificate fresh until ``sleep`` reports a stop; return the number of renewals performed.

    Each round waits (at most :data:`MAX_SLEEP` at a time, re-reading the clock) until the jittered renewal time of
    the current certificate, then renews. Failed renewals are retried with capped exponential backoff; once the
    certificate has expired, renewal falls back to the bootstrap kubeconfig.
    """
    rng = rng or random.SystemRandom()
    outcome = await obtain(opts, progress, now=clock())
    if not outcome.issued:
        progress(f"{opts.kubeconfig} already has a valid certificate for system:node:{opts.node_name}")
    renewals = 0
    backoff = retry_initial
    for _ in range(10_000_000):
        if renewals >= max_renewals:
            return renewals
        start, end = lifetime(outcome.certificate)
        due = renewal_time(start, end, rng)
        progress(f"certificate valid until {outcome.not_after:%Y-%m-%d %H:%M:%S} UTC; renewal at "
                 f"{dt.datetime.fromtimestamp(due, dt.UTC):%Y-%m-%d %H:%M:%S} UTC")
        for _ in range(1_000_000):
            remaining = due - clock()
            if remaining <= 0:
                break
            if await sleep(min(remaining, MAX_SLEEP)):
                return renewals
        for _ in range(1_000_000):
            try:
                outcome = await obtain(opts, progress, renew=True, now=clock())
                renewals += 1
                backoff = retry_initial
                break
            except (CSRDenied, CSRFailed, BootstrapTimeout, BootstrapError) as exc:
                progress(f"renewal failed: {exc}; retrying in {backoff:g}s")
            if await sleep(backoff):
                return renewals
            backoff = min(backoff * 2, retry_max)
    return renewals
