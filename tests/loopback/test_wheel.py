"""The wheel holds every package: built with ``pip wheel --no-deps`` from a copy of the source, installed into a
private ``--target`` directory, and every module of tunneld, proxy, certs and netnames imported from there by a
Python whose working directory and ``sys.path`` hold no source tree (and no editable install's finder)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tunneld", "proxy", "certs", "netnames")

IMPORT_ALL = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    roots = sys.argv[2:]
    bad = [p for p in sys.path if any(p == r or p.startswith(r + "/") for r in roots)]
    assert not bad, f"source tree on sys.path: {bad}"
    imported = {}
    for name in sys.argv[1].split(","):
        pkg = importlib.import_module(name)
        imported[name] = pkg.__file__
        for info in pkgutil.walk_packages(pkg.__path__, name + "."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue  # running it would start the program
            imported[info.name] = importlib.import_module(info.name).__file__
    print(json.dumps(imported))
""")


def _source_modules() -> set[str]:
    names = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            names.add(".".join(parts))
    return names


def test_wheel_installs_every_package_and_module(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in (*PACKAGES, "pyproject.toml", "README.md"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    out, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation and no index: the build uses the setuptools and wheel installed here, offline.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                   check=True, timeout=300, cwd=elsewhere)
    (wheel,) = out.glob("tunneld-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, timeout=300, cwd=elsewhere)
    # -S: no site processing, so no .pth file (an editable install's finder) runs; the dependencies come from the
    # site-packages directories named on PYTHONPATH after the wheel's target. -P: no script directory on sys.path.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *deps])
    result = subprocess.run(
        [sys.executable, "-S", "-P", "-c", IMPORT_ALL, ",".join(PACKAGES), str(ROOT), "/work/main"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    outside = {name: file for name, file in imported.items() if not file.startswith(str(target) + "/")}
    assert not outside, f"imported from outside the wheel: {outside}"
    missing = _source_modules() - set(imported)
    assert not missing, f"modules not in the wheel: {sorted(missing)}"
