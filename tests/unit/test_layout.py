"""The layout's rules, checked on the source: import boundaries, module size, and what users and scripts rely on.

Boundaries (DESIGN.md): ``netnames`` imports nothing of ours; ``certs`` only ``netnames``; ``proxy`` never
``tunneld``; only the SSH boundary (and the dev cluster's simulated sshd, and the SSH CA) import asyncssh. Every
import counts: at module level, inside functions, and ``importlib.import_module`` / ``__import__`` with a constant.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tunneld", "proxy", "certs", "netnames")
ALLOWED: dict[str, set[str]] = {
    "netnames": set(),
    "certs": {"netnames"},
    "proxy": {"netnames", "certs"},
    "tunneld": {"netnames", "certs", "proxy"},
}
ASYNCSSH_HOMES = {"tunneld/tunnels/ssh.py", "tunneld/tunnels/sshchannel.py", "tunneld/tunnels/leanpath.py",
                  "tunneld/tunnels/keepalive.py",
                  "tunneld/dev/sshnode.py", "tunneld/tunnels/dialin_ssh.py", "certs/sshca.py"}
MAX_LINES = 450


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names with their line numbers."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(root, path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            elif node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    yield node.lineno, node.args[0].value


def violations(root: Path) -> list[str]:
    """Every import that crosses a boundary, or asyncssh outside its homes, under ``root``."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imported_modules(root, path):
                top = module.split(".")[0]
                if top in PACKAGES and top != package and top not in ALLOWED[package]:
                    found.append(f"{rel}:{line}: {package} must not import {module}")
                if top == "asyncssh" and rel not in ASYNCSSH_HOMES:
                    found.append(f"{rel}:{line}: only the SSH boundary imports asyncssh")
    return found


def test_no_module_crosses_a_boundary() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize("source", [
    "from tunneld.config import Config\n",
    "def f():\n    import tunneld.tunnels.pool\n",
    "import importlib\nmod = importlib.import_module('tunneld.app')\n",
    "mod = __import__('tunneld')\n",
    "from ..tunneld import app\n",
])
def test_a_planted_violation_is_caught(tmp_path: Path, source: str) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "proxy" / "planted.py").write_text(source)
    if source.startswith("from .."):  # a relative import that climbs out of proxy into tunneld
        (tmp_path / "proxy" / "sub").mkdir()
        (tmp_path / "proxy" / "sub" / "planted.py").write_text("from ...tunneld import app\n")
        (tmp_path / "proxy" / "planted.py").write_text("")
    found = violations(tmp_path)
    assert len(found) == 1 and "proxy must not import tunneld" in found[0], found


def test_asyncssh_outside_the_ssh_boundary_is_caught(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "proxy" / "x.py").write_text("import asyncssh\n")
    assert violations(tmp_path) == ["proxy/x.py:1: only the SSH boundary imports asyncssh"]


def test_no_package_module_is_over_the_size_limit() -> None:
    too_long = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert too_long == []


def test_the_wheel_packages_every_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(PACKAGES)
    assert project["project"]["scripts"] == {"tunneld": "tunneld.cli:main"}


@pytest.mark.parametrize("argv", [
    ["-m", "tunneld", "--help"],
    ["-m", "tunneld.dev.kubelet", "--help"],
    ["-c", "from tunneld.cli import main; main(['--help'])"],
])
def test_entry_points_users_and_units_rely_on(argv: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_documented_logger_names_are_the_ones_the_code_uses() -> None:
    documented = set()
    for doc in ("README.md", "SECURITY.md"):
        documented |= set(re.findall(r"`((?:proxy|certs|tunneld)\.audit)`", (ROOT / doc).read_text()))
    used = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            used |= set(re.findall(r"getLogger\(\"([a-z_.]+)\"\)", path.read_text()))
    assert documented == {"proxy.audit", "certs.audit"}
    assert documented <= used


def test_every_type_ignore_names_its_error_code_and_a_reason() -> None:
    bare = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith("_pb2.py"):
                continue  # generated by protoc
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if "type: ignore" in line and not re.search(r"type: ignore\[[a-z-]+(, *[a-z-]+)*\] +# *\S", line):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert bare == []
