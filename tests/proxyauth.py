"""Credentials for tests that build a proxy front themselves: one static bearer token of a ``system:masters`` user."""

from __future__ import annotations

from typing import Any

from certs.tokens import Authenticator as Tokens
from certs.tokens import BootstrapToken, StaticToken
from proxy.authn import Authenticator

TOKEN = "test-admin-token-0123456789abcdef"
HEADER = ("Authorization", f"Bearer {TOKEN}")
RAW_HEADER = f"Authorization: Bearer {TOKEN}\r\n".encode()


async def _no_bootstrap(token_id: str) -> BootstrapToken | None:
    return None


def admin_authenticator() -> Authenticator:
    """An authenticator that knows :data:`TOKEN` (user ``admin`` in ``system:masters``) and unix peers."""
    tokens = Tokens([StaticToken(TOKEN, "admin", "1", ("system:masters",))], _no_bootstrap)
    return Authenticator(tokens.authenticate)


def bearer_of(config_token_file: object) -> str:
    """``Bearer <token>`` for the first token of a gateway's ``[auth] token_file`` (the dev cluster's user)."""
    from pathlib import Path

    from certs.tokens import load_token_file

    assert isinstance(config_token_file, Path), "the gateway has no [auth] token_file"
    return f"Bearer {load_token_file(config_token_file)[0].token}"


def auth_section(directory: object) -> str:
    """An ``[auth]`` section whose token file (written, 0600, in ``directory``) holds :data:`TOKEN`."""
    from pathlib import Path

    from certs.files import write_secret

    assert isinstance(directory, Path)
    path = directory / "proxy-tokens.csv"
    write_secret(path, f'{TOKEN},admin,1,"system:masters"\n'.encode())
    return f'[auth]\ntoken_file = "{path}"\n\n'


async def proxy_get(gw: Any, target: str, **kw: object) -> Any:
    """``GET target`` on the gateway's TCP proxy listener, as the first user of its ``[auth] token_file``."""
    from tests import rawhttp

    return await rawhttp.get("127.0.0.1", gw.proxy.ports[0], target,
                             headers=[("Authorization", bearer_of(gw.config.auth.token_file))], **kw)
