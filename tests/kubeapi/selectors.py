"""Label and field selectors with the syntax and semantics of ``k8s.io/apimachinery``.

Label selectors (``labels.Parse``): comma-separated requirements that must all
hold; ``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``,
``key in (a,b)``, ``key notin (a,b)``, ``key>1``, ``key<1``. As in Kubernetes,
``!=`` and ``notin`` also match objects that do not carry the key at all.

Field selectors (``fields.ParseSelector``): comma-separated ``path=value``,
``path==value`` or ``path!=value`` over a per-resource set of supported paths
(always ``metadata.name`` and ``metadata.namespace``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
_NAME_PART = re.compile(rf"^{_NAME}$")


class SelectorError(ValueError):
    """A selector that does not parse; the API server answers 400 BadRequest."""


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.match(value))


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS1035_LABEL.match(value))


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a valid label key (a qualified name), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or not is_dns1123_subdomain(prefix)):
        return f"prefix part of {key!r} must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (
            f"name part of {key!r} must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character (at most 63 characters)"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None."""
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (
            f"{value!r}: a valid label must be an empty string or consist of alphanumeric "
            "characters, '-', '_' or '.', and must start and end with an alphanumeric "
            "character (at most 63 characters)"
        )
    return None


@dataclass(frozen=True)
class Requirement:
    """One label requirement: ``key <operator> values``."""

    key: str
    operator: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        op = self.operator
        if op == "exists":
            return present
        if op == "!":
            return not present
        if op in ("=", "in"):
            return present and value in self.values
        if op in ("!=", "notin"):
            return not present or value not in self.values
        if not present:
            return False
        try:
            actual = int(str(value))
        except ValueError:
            return False
        bound = int(self.values[0])
        return actual > bound if op == "gt" else actual < bound


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        return cls(tuple(_LabelParser(text or "").parse()))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(requirement.matches(labels) for requirement in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


_SPECIAL = set(",=!()<>")


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif text.startswith(("==", "!="), i):
            tokens.append(text[i : i + 2])
            i += 2
        elif char in _SPECIAL:
            tokens.append(char)
            i += 1
        else:
            start = i
            while i < len(text) and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            tokens.append(text[start:i])
    return tokens


class _LabelParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _next(self) -> str | None:
        token = self._peek()
        self.pos += 1
        return token

    def _fail(self, why: str) -> SelectorError:
        return SelectorError(f"unable to parse requirement: {why} (in selector {self.text!r})")

    def _identifier(self, what: str) -> str:
        token = self._next()
        if token is None or token in _SPECIAL or token in ("==", "!="):
            raise self._fail(f"found {token!r}, expected: {what}")
        return token

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        if self._peek() is None:
            return requirements
        while True:
            requirements.append(self._requirement())
            token = self._next()
            if token is None:
                return requirements
            if token != ",":
                raise self._fail(f"found {token!r}, expected: ',' or end of string")

    def _requirement(self) -> Requirement:
        if self._peek() == "!":
            self._next()
            key = self._identifier("identifier after '!'")
            self._check_key(key)
            return Requirement(key, "!")
        key = self._identifier("identifier")
        self._check_key(key)
        token = self._peek()
        if token is None or token == ",":
            return Requirement(key, "exists")
        self._next()
        if token in ("=", "=="):
            return Requirement(key, "=", (self._single_value(),))
        if token == "!=":
            return Requirement(key, "!=", (self._single_value(),))
        if token in ("in", "notin"):
            return Requirement(key, token, self._value_set())
        if token in ("<", ">"):
            value = self._identifier("integer value")
            if not re.fullmatch(r"-?\d+", value):
                raise self._fail(
                    f"for 'Gt', 'Lt' operators, the value must be an integer: {value!r}"
                )
            return Requirement(key, "gt" if token == ">" else "lt", (value,))
        raise self._fail(f"found {token!r}, expected: in, notin, =, ==, !=, gt, lt")

    def _check_key(self, key: str) -> None:
        error = label_key_error(key)
        if error:
            raise self._fail(f"key: Invalid value: {error}")

    def _check_value(self, value: str) -> str:
        error = label_value_error(value)
        if error:
            raise self._fail(f"values: Invalid value: {error}")
        return value

    def _single_value(self) -> str:
        token = self._peek()
        if token is None or token == ",":
            return ""  # "key=" selects the empty value
        return self._check_value(self._identifier("value"))

    def _value_set(self) -> tuple[str, ...]:
        if self._next() != "(":
            raise self._fail("expected '(' after in/notin")
        values: list[str] = []
        expect_value = True
        while True:
            token = self._next()
            if token is None:
                raise self._fail("expected ')'")
            if token == ")":
                if expect_value and values:
                    values.append("")  # a trailing comma: "(a,)"
                break
            if token == ",":
                if expect_value:
                    values.append("")
                expect_value = True
                continue
            if not expect_value or token in _SPECIAL:
                raise self._fail(f"found {token!r}, expected ',' or ')'")
            values.append(token)
            expect_value = False
        if not values:
            raise self._fail("for 'in', 'notin' operators, values set can't be empty")
        return tuple(self._check_value(value) for value in values)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    value: str
    negate: bool


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string a field selector compares ``path`` against ("" when absent)."""
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


@dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector over the paths a resource supports."""

    requirements: tuple[FieldRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None, supported: Iterable[str]) -> FieldSelector:
        allowed = set(supported) | {"metadata.name", "metadata.namespace"}
        requirements: list[FieldRequirement] = []
        for part in (text or "").split(","):
            part = part.strip()
            if not part:
                continue
            match = re.fullmatch(r"([^=!]+?)\s*(==|!=|=)\s*(.*)", part)
            if not match:
                raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
            path, operator, value = match.groups()
            if path not in allowed:
                raise SelectorError(f"field label not supported: {path}")
            requirements.append(FieldRequirement(path, value.strip(), operator == "!="))
        return cls(tuple(requirements))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, r.path) == r.value) != r.negate for r in self.requirements)

    def exact_name(self) -> str | None:
        """The name this selector pins down with ``metadata.name=``, if any."""
        for requirement in self.requirements:
            if requirement.path == "metadata.name" and not requirement.negate:
                return requirement.value
        return None
