"""The systemd units: ``systemd-analyze verify`` passes and the service's exposure score is at most 2.5.

``verify`` checks that ExecStart='s binary exists. The shipped unit names /usr/local/bin/tunneld (a system-wide pip
install); where the console script is installed elsewhere (a virtualenv, pyenv), the test verifies a copy of the unit
whose command paths point at the installed script instead, and prints which path it used. Nothing else is changed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
SHIPPED_BINARY = "/usr/local/bin/tunneld"
MAX_EXPOSURE = 2.5

pytestmark = pytest.mark.skipif(not Path(ANALYZE).exists(), reason="systemd-analyze is not installed")


def _installed_tunneld() -> str:
    """The real path of the installed ``tunneld`` console script (not a shell shim)."""
    candidate = Path(sys.executable).with_name("tunneld")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("tunneld")
    assert found, "the tunneld console script is not installed (pip install -e .)"
    return found


def _units() -> list[Path]:
    units = sorted(p for p in SYSTEMD.iterdir() if p.suffix in (".service", ".socket", ".timer", ".path"))
    assert units, f"no units in {SYSTEMD}"
    return units


def _for_this_host(unit: Path, tmp_path: Path) -> Path:
    text = unit.read_text()
    binary = _installed_tunneld()
    if binary != SHIPPED_BINARY:
        print(f"{unit.name}: verifying a copy with {SHIPPED_BINARY} -> {binary}")
        text = text.replace(SHIPPED_BINARY, binary)
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    copy = _for_this_host(unit, tmp_path)
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_service_exposure_score(tmp_path: Path) -> None:
    copy = _for_this_host(SYSTEMD / "tunneld.service", tmp_path)
    proc = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for tunneld\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security --offline=true tunneld.service: exposure {score}")
    assert score <= MAX_EXPOSURE, proc.stdout


def test_service_has_what_the_daemon_relies_on() -> None:
    """The settings the daemon's behaviour depends on (not just the score)."""
    text = (SYSTEMD / "tunneld.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ExecReload"].startswith("/usr/local/bin/tunneld reload --pid $MAINPID")
    assert "ConfigurationDirectory" not in settings  # /etc/tunneld is the administrator's (see the unit)
    assert settings["Restart"] == "on-failure" and settings["WatchdogSec"]
    assert settings["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["User"] == "tunneld" and "tunneld" in (SYSTEMD / "tunneld.sysusers").read_text()
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    # The daemon's default status socket lives in the RuntimeDirectory.
    from tunneld.config import StatusSettings

    assert str(StatusSettings().socket).startswith(f"/run/{settings['RuntimeDirectory']}/")


def test_example_config_matches_the_unit(tmp_path: Path) -> None:
    """The example config parses, and puts the sockets in the unit's RuntimeDirectory."""
    from tunneld.config import load_config

    text = (SYSTEMD / "tunneld.toml.example").read_text()
    (tmp_path / "nodes.toml").write_text('[[nodes]]\nname = "node-1"\naddress = "192.0.2.11"\n')
    cfg_path = tmp_path / "tunneld.toml"
    cfg_path.write_text(text.replace("/etc/tunneld/nodes.toml", str(tmp_path / "nodes.toml")))
    cfg = load_config(cfg_path)
    unit = (SYSTEMD / "tunneld.service").read_text()
    runtime = re.search(r"^RuntimeDirectory=(.*)$", unit, re.M)
    assert runtime is not None
    assert str(cfg.status.socket).startswith(f"/run/{runtime.group(1)}/")
    assert cfg.egress.socket is not None and str(cfg.egress.socket).startswith(f"/run/{runtime.group(1)}/")
    assert "/etc/tunneld/tunneld.toml" in unit and [n.name for n in cfg.nodes] == ["node-1"]
