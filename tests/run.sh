#!/usr/bin/env bash
# Install what the test suite needs (as root on Debian: OpenSSH server and client, iproute2, curl, etcd, systemd's
# analyzer, iptables, systemd-nspawn, debootstrap and faketime; always: the Python package with its test extras),
# run ruff and mypy (either failing fails the run), then the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]} (needs root and apt-get); the system tests will be skipped" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
# Lint and type checks fail the run like a failing test.
python3 -m ruff check .
python3 -m mypy tunneld proxy certs netnames
exec python3 -m pytest "$@"
