"""Building the ``[dialin]`` listener for the pool: its hooks and the revocation list, re-read on SIGHUP."""

from __future__ import annotations

import logging

from tunneld.config import DialinSettings
from tunneld.tunnels import krl
from tunneld.tunnels.dialin_identity import CertFacts
from tunneld.tunnels.dialin_ssh import DialinLink, DialinListener, Hooks
from tunneld.tunnels.pool import Pool

log = logging.getLogger("tunneld.dialin")


class Revoked:
    """The current revocation list (``[dialin] revoked_keys``); an unreadable file keeps the previous one."""

    def __init__(self, settings: DialinSettings) -> None:
        self.path = settings.revoked_keys
        self.list = krl.Revocations()
        if self.path is not None:
            self.list = krl.load(self.path)  # at startup a broken file is fatal

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            self.list = krl.load(self.path)
        except krl.KRLError as exc:
            log.error("dialin.revoked_keys not reloaded (the previous list stays): %s", exc)
            return
        log.info("dialin.revoked_keys reloaded")

    def __call__(self, facts: CertFacts) -> str | None:
        return self.list.revoked(facts)


class Dialin(DialinListener):
    """The listener wired to a pool."""

    def __init__(self, settings: DialinSettings, pool: Pool) -> None:
        self.revocations = Revoked(settings)

        def attach(node: str, link: DialinLink) -> str | None:
            return pool.attach(node, link, settings.replace_grace)

        super().__init__(settings, Hooks(is_dialin_node=pool.dialin_node, attach=attach,
                                         counters_for=pool.counters_for, revoked=self.revocations))

    def reload_revoked(self) -> None:
        """Re-read ``revoked_keys``; connections whose certificate it now revokes are closed."""
        self.revocations.reload()
        closed = self.close_revoked()
        if closed:
            log.warning("closed dial-in connections with revoked certificates: %s", ", ".join(sorted(closed)))


def build_listener(settings: DialinSettings, pool: Pool) -> Dialin:
    """The dial-in listener for ``pool`` (not started)."""
    return Dialin(settings, pool)
