"""The benchmark's command line: a missing ``bench`` extra is reported at once, before anything is measured."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_missing_matplotlib_is_reported_before_measuring(tmp_path: Path) -> None:
    # A matplotlib that cannot be imported shadows the installed one, as on a machine without the extra.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "matplotlib is missing" in proc.stderr and "pip install -e '.[bench]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()


def test_an_unknown_scale_part_is_refused_before_measuring(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "scale", "--scale-part", "warmup", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'warmup' is not one of 'idle', 'storm', 'streams'" in proc.stderr
    assert not (tmp_path / "out").exists()
