"""The ``tunneld`` command line: the daemon's commands (:mod:`.main`), the certificate administrators' commands
(:mod:`.certs`), the node-side commands (:mod:`.node`), terminal rendering (:mod:`.render`) and the client of the
daemon's local API (:mod:`.localapi`)."""

from tunneld.cli.certs import ca, csr, token
from tunneld.cli.kubeconfig import kubeconfig
from tunneld.cli.main import main
from tunneld.cli.node import bootstrap, ssh
from tunneld.cli.reload import reload
from tunneld.cli.sshcommand import node

for _command in (reload, kubeconfig, bootstrap, ssh, node, ca, token, csr):
    main.add_command(_command)

__all__ = ["main"]
