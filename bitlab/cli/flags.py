"""argparse flags from settings dataclasses (`bitlab.settings`), and the settings back from the flags.

Each field becomes `--field-name` with its type, default, help, choices and metavar taken from the
field; lists take `nargs` (`+` unless the field says), booleans are `--x` / `--no-x`. `--config
FILE` reads the same keys from YAML or JSON (a run's config.json); flags given on the command line
override the file. No torch import: `bitlab --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

from bitlab.errors import BitlabError
from bitlab.settings import kinds, read_settings

GIVEN = "given_settings"  # the namespace attribute listing the settings given as flags


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(namespace: argparse.Namespace) -> set[str]:
    if not hasattr(namespace, GIVEN):
        setattr(namespace, GIVEN, set())
    return getattr(namespace, GIVEN)


class _Store(argparse.Action):
    """Stores the value and notes that the setting was given (it then overrides --config)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _given(namespace).add(self.dest)


class _Toggle(argparse.Action):
    """`--x` sets True, `--no-x` False."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, not option_string.startswith("--no-"))
        _given(namespace).add(self.dest)


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_settings(group: argparse._ActionsContainer, cls: type, names: Sequence[str]) -> None:
    """A flag for each of `cls`'s fields in `names`, in that order."""
    fields, types = {f.name: f for f in dataclasses.fields(cls)}, kinds(cls)
    for name in names:
        f, kind, meta = fields[name], types[name], fields[name].metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = None if default is dataclasses.MISSING else default
        text = meta.get("help", "")
        if default is not None and "default" not in text:
            text += f" (default: {_default_text(default)})"
        kw: dict[str, Any] = {"dest": name, "default": default, "help": text.replace("%", "%%")}
        if kind.scalar is bool:  # the flag that changes the default first: usage lines show that one
            toggles = [flag(name), "--no-" + name.replace("_", "-")]
            group.add_argument(*(toggles[::-1] if default else toggles), action=_Toggle, **kw)
            continue
        if kind.many:
            kw["nargs"] = meta.get("nargs") or "+"
        group.add_argument(flag(name), action=_Store, type=kind.scalar, choices=meta.get("choices"),
                           metavar=meta.get("metavar"), **kw)


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="settings from a YAML or JSON file with the keys of a run's "
                        "config.json (rerun an experiment from its record); flags given here override it")


def settings_from_args(cls: type, args: argparse.Namespace) -> Any:
    """`cls` from the `--config` file (if any), overridden by the flags given, else the defaults.
    Fields without a default must come from one of them."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if getattr(args, "config", None):
        given = getattr(args, GIVEN, set())
        values = {**values, **read_settings(cls, args.config), **{n: values[n] for n in given if n in values}}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing := [n for n in required if values.get(n) is None]:
        raise BitlabError(f"the following flags are required: {', '.join(map(flag, missing))}"
                          + (" (or these keys in the --config file)" if getattr(args, "config", None) else ""))
    return cls(**values)
