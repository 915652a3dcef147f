"""Detached JWS (HS256) over the cluster-info kubeconfig, as kubeadm's bootstrap-token discovery uses it.

The control plane publishes, for every bootstrap token allowed to sign, ``jws-kubeconfig-<token id>`` next to the
kubeconfig in the ``cluster-info`` ConfigMap. The value is a compact JWS with the payload left out ("detached"):

    base64url(header) + ".." + base64url(HMAC-SHA256(token secret, base64url(header) + "." + base64url(payload)))

with header ``{"alg":"HS256","kid":"<token id>"}`` (base64url without padding, RFC 7515 appendix F). A node that
holds the whole token can thus check that the kubeconfig it fetched over an unverified connection was published by
someone who knows the token's secret. Verification recomputes the MAC over the header exactly as received and
compares in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re

MAX_JWS_LEN = 4096  # a detached HS256 JWS is about 100 characters; anything far longer is refused unparsed
ALGORITHM = "HS256"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515, section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url`; raises ``ValueError`` on anything that is not base64url."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def _mac(secret: str, signing_input: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()


def sign_detached(payload: bytes, token_id: str, secret: str) -> str:
    """The detached compact JWS (HS256, ``kid`` = ``token_id``) of ``payload`` keyed with the token ``secret``."""
    header = b64url(json.dumps({"alg": ALGORITHM, "kid": token_id}, separators=(",", ":")).encode())
    signature = _mac(secret, f"{header}.{b64url(payload)}".encode("ascii"))
    return f"{header}..{b64url(signature)}"


def verify_detached(jws: str, payload: bytes, token_id: str, secret: str) -> bool:
    """True only if ``jws`` is a detached HS256 JWS of ``payload`` for ``token_id``, keyed with ``secret``.

    Anything malformed (wrong shape, an attached payload, another algorithm, another ``kid``, a bad MAC) is
    simply ``False``; the MAC is compared in constant time.
    """
    if not isinstance(jws, str) or len(jws) > MAX_JWS_LEN:
        return False
    parts = jws.split(".")
    if len(parts) != 3 or parts[1] != "":
        return False
    header_b64, _, signature_b64 = parts
    try:
        header = json.loads(b64url_decode(header_b64))
        signature = b64url_decode(signature_b64)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
        return False
    kid = header.get("kid")
    if not isinstance(kid, str) or not hmac.compare_digest(kid.encode(), token_id.encode()):
        return False
    if set(header) - {"alg", "kid", "typ"}:
        return False  # "crit" and friends: we honour nothing else, so we accept nothing else
    expected = _mac(secret, f"{header_b64}.{b64url(payload)}".encode("ascii"))
    return hmac.compare_digest(expected, signature)
