"""Layered configuration for a daemon: defaults < TOML file < ``EPLB_*`` environment < flags.

One :class:`Option` describes a setting once; from it come the flag (``--min-margin``), the
environment variable (``EPLB_MIN_MARGIN``), the TOML key (``min-margin``), the ``--help`` line and
the check of its value. :func:`resolve` merges the four layers and returns each effective value
with the layer it came from, so ``--print-config`` can show both. Every rejected value raises
:class:`ConfigError` with a message that names the option, where the value came from and what is
accepted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "EPLB_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the message says which, where it came from, and what
    values are accepted."""


@dataclass(frozen=True)
class Option:
    """One setting.

    Args:
        name: dash-separated; the flag is ``--name``, the env variable ``EPLB_NAME`` (upper case,
            ``_`` for ``-``), the TOML key ``name``.
        kind: ``int``, ``float``, ``str``, ``bool`` or ``Path``.
        help: one sentence for ``--help`` and the docs.
        group: the ``--help`` section.
        default: the value when no layer sets it; ``None`` means unset.
        required: start fails when no layer sets it.
        minimum / maximum: inclusive bounds for numbers; ``above``: an exclusive lower bound.
        choices: the only accepted strings.
        check: extra validation of a converted value: returns what is accepted, or None if fine.
        metavar: shown in ``--help``.
        cli_only: a flag with no env variable or TOML key.
        default_text: the default in words, when it is computed at start (``--help``).
        accepted_text: what is accepted, in words, when ``check`` decides.
    """

    name: str
    kind: type
    help: str
    group: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    metavar: str | None = None
    cli_only: bool = False
    default_text: str | None = None
    accepted_text: str | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name

    def accepted(self) -> str:
        """What values are accepted, in words."""
        if self.accepted_text:
            return self.accepted_text
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        word = {int: "an integer", float: "a number", str: "a string", Path: "a path"}[self.kind]
        bounds = []
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return word + (" " + " and ".join(bounds) if bounds else "")


@dataclass(frozen=True)
class Setting:
    """An effective value and the layer it came from (``default``, ``config file PATH``,
    ``environment EPLB_X``, ``flag --x``)."""

    value: Any
    source: str


def option_table(options: Iterable[Option]) -> dict[str, Option]:
    table = {o.name: o for o in options}
    return table


# --- conversion ----------------------------------------------------------------------------------

def _convert(opt: Option, raw: Any, source: str) -> Any:
    """Convert a raw value (a string from a flag or env variable, a TOML value) and check it."""
    value: Any
    try:
        if opt.kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
                value = raw.strip().lower() in _TRUE
            else:
                raise ValueError
        elif opt.kind is int:
            if isinstance(raw, bool) or isinstance(raw, float):
                raise ValueError
            value = int(raw.strip()) if isinstance(raw, str) else int(raw)
        elif opt.kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw.strip()) if isinstance(raw, str) else float(raw)
            if not math.isfinite(value):
                raise ValueError
        elif opt.kind is Path:
            if not isinstance(raw, str) or not raw:
                raise ValueError
            value = Path(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError
            value = raw
    except (TypeError, ValueError):
        raise ConfigError(_bad(opt, source, raw)) from None
    problem = None
    if opt.choices is not None and value not in opt.choices:
        problem = opt.accepted()
    elif opt.kind in (int, float) and (
            (opt.minimum is not None and value < opt.minimum)
            or (opt.maximum is not None and value > opt.maximum)
            or (opt.above is not None and not value > opt.above)):
        problem = opt.accepted()
    elif opt.check is not None:
        problem = opt.check(value)
    if problem:
        raise ConfigError(_bad(opt, source, raw, problem))
    return value


def _bad(opt: Option, source: str, raw: Any, accepted: str | None = None) -> str:
    where = "" if source == f"flag {opt.flag}" else f" (from {source})"
    shown = raw if isinstance(raw, str) else json.dumps(raw)
    return f"bad {opt.flag}{where}: {shown!r} is not accepted; expected {accepted or opt.accepted()}"


# --- layers --------------------------------------------------------------------------------------

def read_toml(path: Path, options: Mapping[str, Option]) -> dict[str, Any]:
    """The settings of a TOML file: a flat table of option names (``min-margin = 4``)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; fix --config or "
                          f"{ENV_PREFIX}CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key in data:
        opt = options.get(key)
        if opt is None or opt.cli_only:
            raise ConfigError(f"config file {path}: unknown key {key!r}; known keys: "
                              + ", ".join(o.key for o in options.values() if not o.cli_only))
    return data


def env_settings(environ: Mapping[str, str], options: Mapping[str, Option],
                 ignore: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """The ``EPLB_*`` variables that name an option, and the names of those that name none (the
    caller warns about them: a typo would otherwise go unnoticed). Variables in ``ignore`` are
    neither."""
    by_env = {o.env: o for o in options.values() if not o.cli_only}
    found: dict[str, str] = {}
    unknown: list[str] = []
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in ignore:
            continue
        opt = by_env.get(var)
        if opt is None:
            unknown.append(var)
        else:
            found[opt.name] = raw
    return found, sorted(unknown)


def resolve(options: Mapping[str, Option], flags: Mapping[str, Any], environ: Mapping[str, str],
            config_path: Path | None, config_source: str = "") -> dict[str, Setting]:
    """Merge defaults < TOML file < environment < flags.

    Args:
        options: by name.
        flags: option name -> raw value, only for flags given on the command line.
        environ: the process environment (``EPLB_*`` variables are read).
        config_path: the TOML file, or None.
        config_source: how ``config_path`` was named, for messages.
    Returns:
        every option with a value (set or defaulted) -> :class:`Setting`.
    Raises:
        ConfigError: a bad value, an unknown key or variable, or a required option unset.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_path is not None:
        layers.append((f"config file {config_path}", read_toml(config_path, options)))
    env, _ = env_settings(environ, options, ignore=(f"{ENV_PREFIX}CONFIG",))
    settings: dict[str, Setting] = {}
    for name, opt in options.items():
        if opt.default is not None:
            settings[name] = Setting(opt.default, "default")
    for source, values in layers:
        for name, raw in values.items():
            settings[name] = Setting(_convert(options[name], raw, f"{source}, key {name}"), source)
    for name, raw in env.items():
        source = f"environment {options[name].env}"
        settings[name] = Setting(_convert(options[name], raw, source), source)
    for name, raw in flags.items():
        source = f"flag {options[name].flag}"
        settings[name] = Setting(_convert(options[name], raw, source), source)
    for name, opt in options.items():
        if opt.required and name not in settings:
            raise ConfigError(f"{opt.flag} is required (or set {opt.env}, or {opt.key} in the "
                              f"config file); expected {opt.accepted()}")
    return settings


# --- argparse ------------------------------------------------------------------------------------

def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add every option as a flag whose raw string is kept for :func:`resolve` (argparse does no
    conversion, so a bad value gets the same message from every layer)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options:
        group = groups.get(opt.group)
        if group is None:
            group = groups[opt.group] = parser.add_argument_group(opt.group)
        text = opt.help
        details = []
        if opt.default_text is not None:
            details.append(f"default: {opt.default_text}")
        elif opt.default is not None:
            shown = opt.default if isinstance(opt.default, str) else format_value(opt.default)
            details.append(f"default: {shown}")
        elif opt.required:
            details.append("required")
        if not opt.cli_only:
            details.append(f"env {opt.env}")
        if opt.kind is not bool and (opt.choices or opt.minimum is not None or opt.maximum is not None
                                     or opt.above is not None):
            details.append(opt.accepted())
        if details:
            text = f"{text} [{'; '.join(details)}]"
        text = text.replace("%", "%%")
        if opt.kind is bool:
            group.add_argument(opt.flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text, dest=opt.name)
        else:
            metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices
                                      else _METAVARS[opt.kind])
            group.add_argument(opt.flag, default=argparse.SUPPRESS, help=text, dest=opt.name,
                               metavar=metavar)


_METAVARS = {int: "N", float: "X", str: "VALUE", Path: "PATH"}


def flags_given(namespace: argparse.Namespace, options: Mapping[str, Option]) -> dict[str, Any]:
    """The raw values of the option flags present on the command line."""
    return {name: getattr(namespace, name) for name in options if hasattr(namespace, name)}


# --- output --------------------------------------------------------------------------------------

def format_value(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are valid TOML


def render_toml(options: Mapping[str, Option], settings: Mapping[str, Setting]) -> str:
    """The effective configuration as a TOML file that ``--config`` reads back, each value
    commented with the layer it came from; unset options are listed as comments."""
    lines = ["# eplb-sidecar effective configuration (--print-config)"]
    group = None
    for name, opt in options.items():
        if opt.cli_only:
            continue
        if opt.group != group:
            group = opt.group
            lines.append(f"\n# --- {group}")
        setting = settings.get(name)
        if setting is None or setting.value is None:
            lines.append(f"# {opt.key} = (unset)")
        else:
            lines.append(f"{opt.key} = {format_value(setting.value)}  # {setting.source}")
    return "\n".join(lines) + "\n"


def config_path_from(flag_value: str | None, environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The TOML file to read: ``--config``, else ``$EPLB_CONFIG``, else none."""
    if flag_value:
        return Path(flag_value), "--config"
    if environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(environ[f"{ENV_PREFIX}CONFIG"]), f"{ENV_PREFIX}CONFIG"
    return None, ""


