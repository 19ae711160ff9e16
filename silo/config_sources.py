"""Where the server configuration's raw values come from, and in which precedence.

Built-in defaults < TOML file (``silo serve -c FILE``) < environment variables
(``SILO_<NAME>``) < command-line flags (``--<name>``). :func:`merge_sources` reads them for a
table of options (``silo.config.OPTIONS``) and passes every value through its option's
parser; unknown TOML keys or sections and unknown override names are ConfigErrors.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Protocol

from silo.config_values import ConfigError, one_line


class OptionLike(Protocol):
    """What the loader needs of an option (``silo.config.Option`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def toml(self) -> str: ...
    @property
    def env(self) -> str: ...
    @property
    def section(self) -> str: ...
    def coerce(self, raw: object) -> object: ...


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _read_toml(
    config_file: str | os.PathLike[str], options: Sequence[OptionLike]
) -> dict[str, object]:
    """Read a TOML config file into {option name: raw value}."""
    where = f"in config file {os.fspath(config_file)!r}"
    by_toml = {o.toml: o for o in options}
    sections = frozenset(o.section for o in options)
    known = [*by_toml, *sections]
    try:
        with open(config_file, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot read config file {os.fspath(config_file)!r}: {reason}") from None
    except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError
        raise ConfigError(
            f"cannot parse config file {os.fspath(config_file)!r}: {one_line(str(e))}"
        ) from None

    values: dict[str, object] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            if section in sections:
                raise ConfigError(f"{section} {where} must be a table ([{section}]), not a value")
            raise ConfigError(f"unknown key {section} {where}{_did_you_mean(section, known)}")
        if section not in sections:
            raise ConfigError(f"unknown section [{section}] {where}{_did_you_mean(section, known)}")
        for key, value in table.items():
            opt = by_toml.get(f"{section}.{key}")
            if opt is None:
                dotted = f"{section}.{key}"
                raise ConfigError(f"unknown key {dotted} {where}{_did_you_mean(dotted, known)}")
            values[opt.name] = value
    return values


def merge_sources(
    options: Sequence[OptionLike],
    defaults: Mapping[str, object],
    argv_overrides: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: str | os.PathLike[str] | None,
) -> dict[str, object]:
    """{option name: parsed value} from ``defaults`` < ``config_file`` < ``environ`` <
    ``argv_overrides`` (see :func:`silo.config.load_config`)."""
    by_name = {o.name: o for o in options}
    raw: dict[str, object] = dict(defaults)
    if config_file is not None:
        raw.update(_read_toml(config_file, options))
    for opt in options:
        value = environ.get(opt.env)
        if value:
            raw[opt.name] = value
    for name, value in argv_overrides.items():
        if name not in by_name:
            raise ConfigError(f"unknown option {name!r}")
        if value is not None:
            raw[name] = value
    return {opt.name: opt.coerce(raw[opt.name]) for opt in options}
