"""Typed reads from parsed JSON: each wrong shape is one ManifestInvalid naming where it is.

    Fields(data, "manifest").int("bytes_logical", 0)    -> an int >= 0, 0 when absent
    Fields(data, "manifest").str("id")                  -> a str, ManifestInvalid when absent

A JSON true is not taken for the integer 1, nor 1 for true. Pure: nothing here touches
the system.
"""

from __future__ import annotations

import re
from typing import Any, Callable, TypeVar

from ..errors import ManifestInvalid

T = TypeVar("T")
REQUIRED: Any = object()
HEX = re.compile(r"[0-9a-f]+")


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


HINT = ("the manifest was damaged, or written by something other than gpusnap; "
        "`gpusnap verify` lists every such snapshot")


def invalid(where: str, what: str, value=REQUIRED) -> ManifestInvalid:
    got = "" if value is REQUIRED else f", not {_kind(value)}"
    return ManifestInvalid(f"{where} must be {what}{got}", hint=HINT)


def int_in(value, where: str, minimum: int = 0, maximum: int | None = None) -> int:
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        bound = f" >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise invalid(where, f"an integer{bound}", value if type(value) is not int else REQUIRED)
    return value


def hex_str(value, where: str, length: int | None = None, max_length: int = 64) -> str:
    if type(value) is not str or not HEX.fullmatch(value) or \
            (length is not None and len(value) != length) or len(value) > max_length:
        size = f"{length}" if length is not None else f"1 to {max_length}"
        raise invalid(where, f"{size} lower-case hex digits", value if type(value) is not str else REQUIRED)
    return value


class Fields:
    """One JSON object being read; self.where names it in errors ("manifest.target")."""

    def __init__(self, data, where: str):
        if type(data) is not dict:
            raise invalid(where, "an object", data)
        self.data, self.where = data, where

    def at(self, key: str) -> str:
        return f"{self.where}.{key}"

    def raw(self, key: str, default=REQUIRED):
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise ManifestInvalid(f"{self.at(key)} is missing", hint=HINT)
        return default() if callable(default) else default

    def str(self, key: str, default=REQUIRED) -> str | None:
        value = self.raw(key, default)
        if type(value) is not str and not (value is None and default is None):
            raise invalid(self.at(key), "a string" + (" or null" if default is None else ""), value)
        return value

    def int(self, key: str, default=REQUIRED, minimum: int = 0,
            maximum: int | None = None) -> int | None:
        value = self.raw(key, default)
        if value is None and default is None:
            return None
        return int_in(value, self.at(key), minimum, maximum)

    def bool(self, key: str, default=REQUIRED) -> bool:
        value = self.raw(key, default)
        if type(value) is not bool:
            raise invalid(self.at(key), "true or false", value)
        return value

    def object(self, key: str, default=REQUIRED) -> dict:
        """A JSON object kept as it is (facts gpusnap passes on, not reads field by field)."""
        value = self.raw(key, default)
        if type(value) is not dict:
            raise invalid(self.at(key), "an object", value)
        return value

    def list(self, key: str, item: Callable[[Any, str], T], default=REQUIRED) -> list[T]:
        value = self.raw(key, default)
        if type(value) is not list:
            raise invalid(self.at(key), "a list", value)
        return [item(v, f"{self.at(key)}[{i}]") for i, v in enumerate(value)]

    def mapping(self, key: str, item: Callable[[Any, str], T], default=REQUIRED) -> dict[str, T]:
        value = self.object(key, default)
        return {k: item(v, f"{self.at(key)}.{k}") for k, v in value.items()}

    def nested(self, key: str, parse: Callable[["Fields"], T], default=REQUIRED) -> T | None:
        """A sub-object parsed by parse(Fields); default when absent (None: also when null)."""
        if key not in self.data and default is not REQUIRED:
            return default() if callable(default) else default
        value = self.raw(key)
        if value is None and default is None:
            return None
        return parse(Fields(value, self.at(key)))


def string(value, where: str) -> str:
    if type(value) is not str:
        raise invalid(where, "a string", value)
    return value


def number(value, where: str) -> float:
    if type(value) not in (int, float):
        raise invalid(where, "a number", value)
    return value


def pid(value, where: str) -> int:
    return int_in(value, where, minimum=1)
