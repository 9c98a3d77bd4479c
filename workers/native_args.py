"""Keyword arguments of the native Twinkle API's named classes, checked against allow-lists.

`twinkle_client` sends a class *name* plus its constructor's kwargs as flat JSON (`set_loss`,
`set_optimizer`, `set_lr_scheduler`). Twinkle itself looks the name up in a module and calls it
with whatever came; here every name has a table of the arguments it takes (`Arg`), and
`parse_args` turns the JSON values into checked Python values or raises an `NativeArgError`
that names the field and says what is allowed. Nothing is ever imported by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

REQUIRED: Any = object()  # an Arg default that means "the caller must give it"


class NativeArgError(ValueError):
    """A bad native-API argument; `field` names it (e.g. "loss_cls", "epsilon")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnknownNativeName(NativeArgError):
    """A class name outside an allow-list; the message lists the allowed names."""


def unknown_name(field: str, kind: str, name: object, allowed: Mapping[str, object]) -> UnknownNativeName:
    return UnknownNativeName(field, f"{field}: unknown {kind} {name!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class Rule:
    """A range check on a parsed value, with the words an error message uses for it."""

    text: str
    ok: Callable[[Any], bool]


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: v >= low)


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: v > low)


def within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    text = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Rule(text, lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high))


# Kinds of values: "float", "int", "bool", "str", "floats" (a list of numbers), "ints" (a list of
# ints), "pair" (exactly two numbers, e.g. Adam's betas).
@dataclass(frozen=True)
class Arg:
    kind: str
    default: Any = REQUIRED
    rule: Rule | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False  # None is a legal value (it means "use the other argument", say)


def parse_args(owner: str, specs: Mapping[str, Arg], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument of `specs`, from `given` or its default; errors name `owner.field`."""
    unknown = [k for k in given if k not in specs]
    if unknown:
        allowed = ", ".join(specs) or "none"
        raise NativeArgError(unknown[0], f"{unknown[0]}: {owner} takes no argument {unknown[0]!r}; allowed: {allowed}")
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in given:
            out[name] = parse_value(f"{owner}.{name}", name, spec, given[name])
        elif spec.default is REQUIRED:
            raise NativeArgError(name, f"{name}: {owner} needs {name!r}")
        else:
            out[name] = spec.default
    return out


def parse_value(label: str, field: str, spec: Arg, value: Any) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise NativeArgError(field, f"{field}: {label} must not be null")
    parsed = _PARSERS[spec.kind](label, field, value)
    if spec.choices is not None and parsed not in spec.choices:
        raise NativeArgError(
            field, f"{field}: {label} must be one of {', '.join(map(repr, spec.choices))}, got {value!r}"
        )
    items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    if spec.rule is not None and not all(spec.rule.ok(v) for v in items):
        raise NativeArgError(field, f"{field}: {label} must be {spec.rule.text}, got {value!r}")
    return parsed


def _number(label: str, field: str, value: Any) -> float:
    # bool is an int in Python; `true` for a learning rate is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NativeArgError(field, f"{field}: {label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise NativeArgError(field, f"{field}: {label} must be finite, got {value!r}")
    return float(value)


def _int(label: str, field: str, value: Any) -> int:
    # JSON has one number type: 3.0 is accepted as 3, 3.5 is not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise NativeArgError(field, f"{field}: {label} must be an integer, got {value!r}")
    return value


def _bool(label: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise NativeArgError(field, f"{field}: {label} must be true or false, got {value!r}")
    return value


def _str(label: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise NativeArgError(field, f"{field}: {label} must be a string, got {value!r}")
    return value


def _list(label: str, field: str, value: Any, item: Callable[[str, str, Any], Any]) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise NativeArgError(field, f"{field}: {label} must be a list, got {value!r}")
    return [item(label, field, v) for v in value]


def _pair(label: str, field: str, value: Any) -> tuple[float, float]:
    items = _list(label, field, value, _number)
    if len(items) != 2:
        raise NativeArgError(field, f"{field}: {label} must be a list of two numbers, got {value!r}")
    return (items[0], items[1])


_PARSERS: dict[str, Callable[[str, str, Any], Any]] = {
    "float": _number,
    "int": _int,
    "bool": _bool,
    "str": _str,
    "floats": lambda label, field, v: _list(label, field, v, _number),
    "ints": lambda label, field, v: _list(label, field, v, _int),
    "pair": _pair,
}
