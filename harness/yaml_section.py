"""One mapping of a YAML config, read strictly: every key read is remembered, so the rest can be
refused by name (a misspelt key that is silently ignored is how a fragment or a threshold gets
dropped without anyone noticing). config.py reads the common sections with it, each backend its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError


class Section:
    """Reads one mapping of the YAML, remembering which keys were used so the rest can be refused."""

    def __init__(self, path: Path, key: str, data: Any):
        self.file = path
        self.key = key
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error("", f"expected a mapping, got {type(data).__name__}")
        self.data = data
        self.allowed: list[str] = []

    def error(self, key: str, message: str) -> ConfigError:
        where = ".".join(part for part in (self.key, key) if part) or "(top level)"
        return ConfigError(f"{self.file}: {where}: {message}")

    def _get(self, key: str, default: Any) -> Any:
        self.allowed.append(key)
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = None, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, REQUIRED if default is None else default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"'{value}' is not one of: {', '.join(choices)}")
        return value

    def integer(self, key: str, default: Any, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"expected a whole number from {low} to {high}, got {value!r}")
        return value

    def number(self, key: str, default: Any, low: float, high: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:
            raise self.error(key, f"expected a number from {low} to {high}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def path(self, key: str, default: Any = None) -> Path | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a path, got {value!r}")
        # An unset variable stays in the path: the config still loads for `plan`, `status` and
        # `down`, and what needs the file says which variable to export (see unexpanded()).
        expanded = os.path.expandvars(os.path.expanduser(value))
        return (self.file.parent / expanded).resolve()

    def string_list(self, key: str, default: Any, choices: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        for item in value:
            if choices and item not in choices:
                raise self.error(key, f"'{item}' is not one of: {', '.join(choices)}")
        return tuple(value)

    def section(self, key: str, required: bool = False) -> "Section":
        value = self._get(key, REQUIRED if required else {})
        return Section(self.file, ".".join(p for p in (self.key, key) if p), value)

    def items(self, key: str) -> list["Section"]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {type(value).__name__}")
        prefix = ".".join(p for p in (self.key, key) if p)
        return [Section(self.file, f"{prefix}[{index}]", item) for index, item in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - set(self.allowed))
        if unknown:
            raise self.error(unknown[0], f"unknown key; allowed here: {', '.join(self.allowed)}")


REQUIRED = object()


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: the
    second would silently win, and the first is usually the one the user meant to change."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found key '{key}' a second time (first at line {seen[key].line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def unexpanded(path: Path) -> str | None:
    """The environment variable a config path still names because it was not set, if any."""
    return next((part for part in path.parts if part.startswith("$")), None)


def required_path(section: Section, key: str) -> Path:
    """Checked for existence by what uses the file, not here: `status` and `down` must load the
    config even where a host build's files are not."""
    path = section.path(key, default=REQUIRED)
    assert path is not None
    return path
