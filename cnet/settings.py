"""Settings as plain values, checked at the boundary: the rules every settings dataclass of cnet
is checked with (:func:`check_settings`, one line naming the setting, the value and what is
allowed: :class:`SettingError`), and the bridge from a dataclass's fields to command-line flags
(:func:`add_flags`, :func:`settings_from_flags`). Below everything that has settings: the
world's pretraining and the ControlNet trainer use the same rules."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Rule",
    "SettingError",
    "add_flags",
    "check_settings",
    "decay_rate",
    "flag_type",
    "fraction",
    "is_hub_id",
    "non_negative_int",
    "non_negative_number",
    "one_of",
    "parse_bool",
    "positive_int",
    "positive_number",
    "settings_from_flags",
]


class SettingError(ValueError):
    """A setting has a value that cannot work; the message is one line naming the setting, the
    value and what is allowed."""


Rule = tuple[Callable[[Any], bool], str]


def positive_int() -> Rule:
    return (lambda v: isinstance(v, int) and v >= 1), "an integer >= 1"


def non_negative_int() -> Rule:
    return (lambda v: isinstance(v, int) and v >= 0), "an integer >= 0"


def positive_number() -> Rule:
    return (
        lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
        "a finite number > 0",
    )


def non_negative_number() -> Rule:
    return (
        lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
        "a finite number >= 0",
    )


def fraction() -> Rule:
    return (lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0, "a number from 0 to 1")


def decay_rate() -> Rule:
    """An EMA's decay: 1 would never move the average."""
    return (
        lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0,
        "a number from 0 up to, not including, 1",
    )


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def check_settings(settings: Any, rules: Mapping[str, Rule]) -> None:
    """Check each field of a settings dataclass against its rule; the first failure raises a
    :class:`SettingError` naming the setting, the value and what is allowed."""
    for name, (ok, allowed) in rules.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not ok(value):
            raise SettingError(f"{name}: {value!r} is not allowed; expected {allowed}")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_type(field: dataclasses.Field) -> Callable[[str], Any]:
    """How a settings field's value is read from the command line."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    return {"bool": parse_bool, "int": int, "float": float}.get(kind, str)


def add_flags(
    parser: argparse.ArgumentParser, settings_class: type, skip: tuple[str, ...] = ()
) -> None:
    """One ``--<field>`` flag per field of ``settings_class`` (default: not given)."""
    for field in dataclasses.fields(settings_class):
        if field.name in skip:
            continue
        kind = flag_type(field)
        parser.add_argument(
            f"--{field.name}",
            type=kind,
            default=None,
            metavar="true|false" if kind is parse_bool else None,
        )


def settings_from_flags(
    settings_class: type, args: argparse.Namespace, profile: Mapping[str, Any]
) -> Any:
    """The profile's values with every flag given on the command line on top."""
    values = dict(profile)
    values.update(
        {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(settings_class)
            if getattr(args, f.name, None) is not None
        }
    )
    return settings_class(**values)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (``org/name``: two parts, neither empty, not a path from
    here, its first part no folder here), the one other way than a local folder to name a base;
    diffusers downloads it where a hub is reachable."""
    parts = str(name).split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not str(name).startswith((".", "/"))
        and not Path(parts[0]).exists()
    )
