"""Reading TOML: the file itself, and typed keys out of one table with every mistake recorded, not raised."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from tunneld.errors import ConfigError


class Section:
    """Reads typed keys out of one TOML table, recording problems instead of raising."""

    def __init__(self, data: dict[str, Any], where: str, base: Path, problems: list[str]) -> None:
        self.data = data
        self.where = where
        self.base = base
        self.problems = problems
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self._key(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.problem(key, f"expected {kind_name(kinds)}, got a boolean")
            return default
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            self.problem(key, f"expected {kind_name(kinds)}, got {type(value).__name__} {value!r}")
            return default
        return value

    def number(self, key: str, default: float, *, above: float | None = 0.0) -> float:
        """A number that must be greater than ``above`` (any number when ``above`` is None)."""
        value = self.get(key, float, default)
        if above is not None and value <= above:
            self.problem(key, f"{value:g} is not greater than {above:g}")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int = 2**31) -> int:
        value = self.get(key, int, default)
        if not minimum <= value <= maximum:
            self.problem(key, f"{value} is not between {minimum} and {maximum}")
            return default
        return int(value)

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, minimum=1, maximum=65535)

    def path(self, key: str, default: Path | None) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return default
        if value == "":
            return None
        return (self.base / Path(value).expanduser()).resolve()

    def unknown(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problem(key, "unknown key")


def kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: file not found"]) from exc
    except PermissionError as exc:
        raise ConfigError([f"{path}: permission denied"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
