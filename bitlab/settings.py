"""Settings as dataclasses: one source of truth per setting (no torch import).

A command's config dataclass declares each setting once with `setting(default, help, check=...)`:
its default, the help text `bitlab.cli.flags` turns into its flag, and the values it accepts.
`validate(obj)` refuses a value no run can use with a `ConfigError` naming the setting
(`base_lr must be a positive number, got -1`), which the CLI words as the flag. `read_settings`
reads the same keys from a YAML or JSON file: a run's `config.json` reruns it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bitlab.errors import BitlabError, ConfigError


@dataclass(frozen=True)
class Check:
    """What a setting's value must be: `ok(value)`, else "must be `what`". `each`: checked per
    element of a list (the error shows the element)."""

    ok: Callable[[Any], bool]
    what: str
    each: bool = False


def at_least(n: int, what: str | None = None) -> Check:
    return Check(lambda v: v >= n, what or f"at least {n}")


POSITIVE_NUMBER = Check(lambda v: math.isfinite(v) and v > 0, "a positive number")
FINITE = Check(math.isfinite, "a finite number")
FRACTION = Check(lambda v: 0 <= v < 1, "at least 0 and below 1")
NOT_NEGATIVE = at_least(0, "0 or more")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
            choices: tuple | None = None, metavar: str | tuple[str, ...] | None = None, nargs: int | str | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with what the CLI and `validate` need: `help` (its flag's text), `check`,
    `choices`, and for the flag `metavar` and `nargs` (lists: "+" unless given). No default: required."""
    metadata = {"help": help, "check": check, "choices": choices, "metavar": metavar, "nargs": nargs}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(obj: Any) -> None:
    """Refuse the first field of `obj` whose value fails its `check` or `choices`. None passes where
    the type allows it (it means "the default"), and is refused elsewhere."""
    optional = {name: kind.optional for name, kind in kinds(type(obj)).items()}
    for f in dataclasses.fields(obj):
        value, check, choices = getattr(obj, f.name), f.metadata.get("check"), f.metadata.get("choices")
        if value is None and optional[f.name]:
            continue
        if choices is not None and value not in choices:
            raise ConfigError(f.name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        if value is None:
            raise ConfigError(f.name, "must be given, got None")
        for v in (value if check and check.each else [value]):
            if check is not None and not check.ok(v):
                raise ConfigError(f.name, f"must be {check.what}, got {repr(v) if isinstance(v, str) else v}")


# ----------------------------------------------------------------------------- types
@dataclass(frozen=True)
class Kind:
    """A field's type as flags and files need it: the scalar type, a list of it, and None allowed."""

    scalar: type
    many: bool = False
    optional: bool = False


@functools.cache
def kinds(cls: type) -> dict[str, Kind]:
    """Each field's `Kind`, from the class's type hints (`int`, `float | None`, `list[int] | None`...)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = rest[0], len(rest) < len(typing.get_args(hint))
        many = typing.get_origin(hint) is list
        out[f.name] = Kind(typing.get_args(hint)[0] if many else hint, many, optional)
    return out


def _coerce(value: Any, scalar: type) -> Any:
    if scalar is float and isinstance(value, str):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if isinstance(value, bool) and scalar is not bool:
        raise TypeError  # true is no number
    if not isinstance(value, (int, float) if scalar is float else scalar):
        raise TypeError
    return float(value) if scalar is float else value


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BitlabError(f"{path}: cannot read settings ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise BitlabError(f"{path}: not valid JSON ({e})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BitlabError(f"{path}: not valid YAML ({e})") from None


def read_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or JSON file (`.json`: JSON, else YAML, which reads JSON too), keyed
    as `cls`'s fields, i.e. as a run's config.json. An unknown key or a value of the wrong type is an
    error naming the key and the file."""
    path = Path(path)
    return settings_from(cls, load_file(path), str(path))


def load_file(path: str | Path) -> Any:
    """A YAML or JSON file's data (`.json`: JSON, else YAML); unreadable or malformed: an error naming it."""
    return _load(Path(path))


def settings_from(cls: type, data: Any, where: str) -> dict[str, Any]:
    """`read_settings` for data already read (one entry of a list in a file): `where` names it in errors."""
    if not isinstance(data, dict):
        raise BitlabError(f"{where}: expected settings as key: value pairs, found {type(data).__name__}")
    known = kinds(cls)
    out = {}
    for key, value in data.items():
        if key not in known:
            raise BitlabError(f"{where}: unknown setting {key!r} (the settings are {', '.join(known)})")
        kind = known[key]
        try:
            if value is None:
                if not kind.optional:
                    raise TypeError
                out[key] = None
            elif kind.many:
                if not isinstance(value, list):
                    raise TypeError
                out[key] = [_coerce(v, kind.scalar) for v in value]
            else:
                out[key] = _coerce(value, kind.scalar)
        except (TypeError, ValueError):
            what = f"a list of {kind.scalar.__name__}" if kind.many else kind.scalar.__name__
            raise BitlabError(f"{where}: {key} must be {what}{' or null' if kind.optional else ''}, got {value!r}") \
                from None
    return out
