"""Device selectors: which registered devices a build target means.

A selector maps attribute names to conditions; a device matches when every condition holds for its
attribute of that name (a missing attribute never matches). A condition is one of

- an exact value: `os: android`, `device: pixel-8`;
- a version range in interval notation: `os_version: "[13,15)"` (13 ≤ v < 15), `"(1.17,]"` (v > 1.17),
  `"[2.0,2.0]"` (exactly 2.0), either end may be empty;
- a comparison: `">=8000000000"`, `"<15"`, `"!=x86_64"`, `"==14"`.

Versions compare numerically part by part, the way Android, Debian and Python number releases:
"13.1" < "13.10" < "14", and "14" == "14.0". A part that is not a number compares as text after
all numbers ("1.2.beta" > "1.2.9"), so odd strings still order deterministically. Parsing happens
when a build is created (`parse`, INVALID_ARGUMENT naming the field), matching on every lease.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from shared.errors import InvalidArgument

_COMPARISON = re.compile(r"^(>=|<=|==|!=|>|<)\s*(\S.*)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\[\]()]*?)\s*,\s*([^,\[\]()]*?)\s*([\])])$")


def version_key(value: str) -> tuple:
    """Sort key of a version string: numeric parts as numbers, trailing zeros ignored."""
    parts = [p for p in re.split(r"[.\-_+]", value.strip()) if p != ""]
    key = [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]
    while key and key[-1] == (0, 0, ""):
        key.pop()
    return tuple(key)


@dataclasses.dataclass(frozen=True)
class Condition:
    text: str
    exact: str | None = None
    op: str | None = None
    operand: str | None = None
    low: str | None = None
    low_inclusive: bool = True
    high: str | None = None
    high_inclusive: bool = True

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.op is not None:
            if self.op == "==":
                return version_key(value) == version_key(self.operand)
            if self.op == "!=":
                return value != self.operand and version_key(value) != version_key(self.operand)
            left, right = version_key(value), version_key(self.operand)
            return {">": left > right, ">=": left >= right, "<": left < right, "<=": left <= right}[self.op]
        key = version_key(value)
        if self.low is not None:
            low = version_key(self.low)
            if key < low or (key == low and not self.low_inclusive):
                return False
        if self.high is not None:
            high = version_key(self.high)
            if key > high or (key == high and not self.high_inclusive):
                return False
        return True


def parse_condition(text: str, field: str = "selector") -> Condition:
    stripped = text.strip()
    if not stripped:
        raise InvalidArgument(f"{field} is empty; give a value, a range like \"[13,15)\" or a comparison "
                              f"like \">=14\"", field=field)
    comparison = _COMPARISON.match(stripped)
    if comparison:
        return Condition(text, op=comparison.group(1), operand=comparison.group(2).strip())
    if stripped[0] in "[(" and stripped[-1] in "])":                # meant as a range, so it must be one
        interval = _INTERVAL.match(stripped)
        if not interval:
            raise InvalidArgument(f"{field} {text!r} is not a version range; write e.g. \"[13,15)\" or "
                                  f"\"(1.17,]\"", field=field)
        opening, low, high, closing = interval.groups()
        if not low and not high:
            raise InvalidArgument(f"{field} {text!r} has neither a lower nor an upper bound", field=field)
        if low and high and version_key(low) > version_key(high):
            raise InvalidArgument(f"{field} {text!r} is empty: {low} is above {high}", field=field)
        return Condition(text, low=low or None, low_inclusive=opening == "[", high=high or None,
                         high_inclusive=closing == "]")
    return Condition(text, exact=text)


@dataclasses.dataclass(frozen=True)
class Selector:
    conditions: tuple[tuple[str, Condition], ...]

    def matches(self, attributes: Mapping[str, str]) -> bool:
        return all(condition.holds(attributes.get(key)) for key, condition in self.conditions)

    def describe(self) -> str:
        return ", ".join(f"{key}: {condition.text}" for key, condition in self.conditions)


def parse(selector: Mapping[str, str], field: str = "selector") -> Selector:
    """Parses every condition (INVALID_ARGUMENT naming `field.key` for a malformed one)."""
    conditions = []
    for key in sorted(selector):
        if not key or len(key) > 128:
            raise InvalidArgument(f"{field} has an empty or over-long attribute name", field=field)
        conditions.append((key, parse_condition(selector[key], f"{field}.{key}")))
    return Selector(tuple(conditions))
