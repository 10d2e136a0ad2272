"""The machinery behind the settings of the agent and the aggregator: declared once, on the
dataclass fields that use them.

A settings dataclass declares each of its settings on its field, with :func:`setting` (default,
help, whether secret, the choices, or how its text is read); :func:`declared` makes the
registry's rows (:class:`Setting`) from those fields, and :func:`build` makes the dataclass from
resolved values. :func:`resolve` layers defaults, a TOML file, the environment and command-line
overrides, in that order, and says where each value came from. It reads the kinds once for both
programs: integers, text, on/off switches (``"on"``/``"off"``, or TOML's true/false) and
choices (one of a few words). Unknown keys and values of the wrong kind raise the caller's error
class, naming the setting, the bad value and its source: for a file, its line, table and key
(``agent.toml line 12, [count] window_s``). Given a ``problems`` list, :func:`resolve` appends
every mistake to it instead of raising at the first, so a caller can report them all at once
(:func:`report`). :func:`show` is ``config show`` for both programs.
Standard library only: the aggregator imports it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast, overload

__all__ = [
    "Problems",
    "Setting",
    "Value",
    "build",
    "declared",
    "redefault",
    "report",
    "resolve",
    "setting",
    "show",
]

_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_METADATA = "footfall.setting"
_MASK = "********"

Value = int | str | bool
"""A resolved value: an integer, a text, or an on/off switch."""
T = TypeVar("T")
V = TypeVar("V", int, str, bool)
C = TypeVar("C", bound=str)


@dataclass(frozen=True, slots=True)
class _Declared:
    """What :func:`setting` puts on a field: how :func:`declared` and :func:`build` read it."""

    default: Value
    help: str
    secret: bool | Callable[[str], str]
    choices: tuple[str, ...]
    parse: Callable[[str], object] | None
    key: str | None


@overload
def setting(
    default: C,
    help: str,
    *,
    choices: tuple[C, ...],
    secret: bool | Callable[[str], str] = False,
    key: str | None = None,
) -> C: ...
@overload
def setting(
    default: V,
    help: str,
    *,
    secret: bool | Callable[[str], str] = False,
    choices: tuple[str, ...] = (),
    key: str | None = None,
) -> V: ...
@overload
def setting(
    default: str,
    help: str,
    *,
    parse: Callable[[str], T],
    secret: bool | Callable[[str], str] = False,
    key: str | None = None,
) -> T: ...
def setting(
    default: Value,
    help: str,
    *,
    secret: bool | Callable[[str], str] = False,
    choices: tuple[str, ...] = (),
    parse: Callable[[str], Any] | None = None,
    key: str | None = None,
) -> Any:
    """A settings dataclass's field that is a setting, named ``<section>.<key or field name>``.

    ``default`` is the value as written in a config file: an ``int``, a text, or a ``bool``
    (an on/off switch, written ``"on"``/``"off"``); with ``choices`` the text must be one of
    them. ``parse`` reads a text setting into the field's value (raising the program's
    ConfigError naming the setting); the field's default is then ``parse(default)``.
    ``secret``: ``config show`` masks the value (a function: masks it so, as a database URL's
    password)."""
    declared = _Declared(default, help, secret, choices, parse, key)
    value = default if parse is None else parse(str(default))
    return dataclasses.field(default=value, repr=not secret, metadata={_METADATA: declared})


def redefault(cls: type[Any], name: str, default: V, help: str | None = None) -> V:
    """Setting ``name`` of the settings class ``cls`` declared again in a subclass, with its own
    default (and help, if given): a setting both programs have is declared once, in the base
    (:class:`~firmware_agent.contract.broker.BrokerBase`), and each program picks its default."""
    base = next(f.metadata[_METADATA] for f in dataclasses.fields(cls) if f.name == name)
    declared = dataclasses.replace(base, default=default, help=help or base.help)
    value = default if base.parse is None else base.parse(str(default))
    return cast(
        V, dataclasses.field(default=value, repr=not base.secret, metadata={_METADATA: declared})
    )


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of a registry: a setting's dotted name, default (as written), help and kind."""

    name: str
    default: Value
    help: str
    secret: bool | Callable[[str], str] = False
    env_prefix: str = "FOOTFALL_"
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return self.env_prefix + self.name.upper().replace(".", "_")

    def shown(self, value: Value) -> str:
        """``value`` as ``config show`` prints it: quoted as in a TOML file, secrets masked."""
        if isinstance(value, bool):
            return repr("on" if value else "off")
        if callable(self.secret):
            return repr(self.secret(str(value)))
        return repr(_MASK) if self.secret and value else repr(value)


def _settings_fields(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], _Declared]]:
    return [(f, f.metadata[_METADATA]) for f in dataclasses.fields(cls) if _METADATA in f.metadata]


def declared(section: str, cls: type[Any], env_prefix: str = "FOOTFALL_") -> tuple[Setting, ...]:
    """The registry rows of the settings ``cls`` declares (:func:`setting`), in ``[section]``."""
    return tuple(
        Setting(f"{section}.{d.key or f.name}", d.default, d.help, d.secret, env_prefix, d.choices)
        for f, d in _settings_fields(cls)
    )


def build(cls: type[T], section: str, values: Mapping[str, Value], **given: object) -> T:
    """``cls`` from the resolved ``values`` of the settings it declares in ``[section]`` (each
    read by its ``parse``, if it has one), and ``given``: its fields that are not settings."""
    made: dict[str, object] = {}
    for f, d in _settings_fields(cls):
        value = values[f"{section}.{d.key or f.name}"]
        made[f.name] = value if d.parse is None else d.parse(str(value))
    return cls(**made, **given)


def show(
    settings: Sequence[Setting],
    values: Mapping[str, Value],
    sources: Mapping[str, str],
    *,
    help_text: bool = False,
) -> str:
    """``config show``: a line per setting, ``name  value  (where it came from)``, secrets
    masked; with ``help_text``, each setting's help under it."""
    width = max(len(s.name) for s in settings)
    lines = []
    for s in settings:
        lines.append(f"{s.name:<{width}}  {s.shown(values[s.name]):<12}  ({sources[s.name]})")
        if help_text:
            lines.append(f"    {s.help}")
    return "\n".join(lines)


def _words(choices: Sequence[str]) -> str:
    quoted = [repr(c) for c in choices]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _places(path: Path, text: str) -> dict[str, str]:
    """Dotted name -> ``FILE line N, [table] key`` for each key written in a TOML file (one
    key per line, as config files are written; a name not found keeps just the file)."""
    places, table = {}, ""
    for number, line in enumerate(text.splitlines(), 1):
        if found := _TABLE.match(line):
            table = found[1]
        elif found := _KEY.match(line):
            name = f"{table}.{found[1]}" if table else found[1]
            places[name] = f"{path} line {number}, [{table}] {found[1]}"
    return places


class Problems:
    """Every mistake in the settings, each with where its setting was set (``places``, filled
    by :func:`resolve`): :meth:`check` builds a section, and where one of its values is wrong,
    notes why and builds it from defaults, so that the checks after it still run;
    :meth:`raise_found` reports them all at once."""

    def __init__(self, settings: Sequence[Setting], error: type[Exception]) -> None:
        self.settings = settings
        self.error = error
        self.found: list[str] = []
        self.places: dict[str, str] = {}

    def check(self, section: str, make: Callable[[], T], fallback: Callable[[], T]) -> T:
        """``make()``; if it raises the settings' error, the message (with the places of the
        ``section`` settings it names) is noted and ``fallback()`` is returned."""
        try:
            return make()
        except self.error as exc:
            self.found.append(self._placed(str(exc), section))
            return fallback()

    def raise_found(self, path: Path | None) -> None:
        """Raise the settings' error with every mistake noted, if there is one."""
        if self.found:
            what = str(path) if path is not None else "the settings"
            raise self.error(report(self.found, what))

    def _placed(self, message: str, section: str) -> str:
        """The message, with where each setting of ``section`` it names was set."""
        named = [
            s.name
            for s in self.settings
            if s.name.startswith(section)
            and re.search(rf"\b{re.escape(s.name.removeprefix(section))}\b", message)
        ]
        where = [
            self.places[n] for n in named if n in self.places and self.places[n] not in message
        ]
        return f"{message} ({'; '.join(where)})" if where else message


def report(problems: Sequence[str], what: str) -> str:
    """Every problem in one message: one line if there is one, a list otherwise."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in {what}:\n" + "\n".join(f"  - {p}" for p in problems)


def resolve(
    settings: Sequence[Setting],
    path: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, object],
    error: type[Exception],
) -> tuple[dict[str, Value], dict[str, str], Problems]:
    """(values, sources, problems), values and sources by name: defaults, then ``path``, then
    ``environ``, then overrides. A mistake is noted in ``problems`` (the setting keeps its
    default), whose ``places`` say where each value was set: a file's line, table and key."""
    by_name = {s.name: s for s in settings}
    problems = Problems(settings, error)

    def unknown(name: str, where: str) -> Exception:
        hint = difflib.get_close_matches(name, by_name, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        allowed = "" if hint else " (the settings are listed by 'config show --help-text')"
        return error(f"{where}: unknown setting {name!r}{did_you_mean}{allowed}")

    def coerce(setting: Setting, value: object, where: str) -> Value:
        text = value.strip() if isinstance(value, str) else None
        if isinstance(setting.default, bool):
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in ("on", "off"):
                return text.lower() == "on"
            raise error(f"{setting.name} must be 'on' or 'off', got {value!r} (from {where})")
        if isinstance(setting.default, int):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if text is not None:
                try:
                    return int(text)
                except ValueError:
                    pass
            raise error(f"{setting.name} must be an integer, got {value!r} (from {where})")
        if setting.choices:
            if text is not None and text.lower() in setting.choices:
                return text.lower()
            raise error(
                f"{setting.name} must be {_words(setting.choices)}, got {value!r} (from {where})"
            )
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            return str(value)  # a TOML number for a text setting (the calibration's) too
        raise error(f"{setting.name} must be a string, got {value!r} (from {where})")

    values: dict[str, Value] = {s.name: s.default for s in settings}
    sources = {s.name: "default" for s in settings}
    layers: list[tuple[str, Mapping[str, object]]] = []
    file_places: dict[str, str] = {}
    if path is not None:
        try:
            text = path.read_text()
            table = tomllib.loads(text)
        except OSError as exc:
            raise error(f"{path}: cannot read config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise error(f"{path}: not valid TOML: {exc}") from exc
        file_places = _places(path, text)
        layers.append((str(path), _flatten(table)))
    layers.append(("", {s.name: environ[s.env] for s in settings if s.env in environ}))
    layers.append(("command line", overrides))
    for where, layer in layers:
        for name, value in layer.items():
            place = file_places.get(name, where) if where == str(path) else where
            try:
                if name not in by_name:
                    raise unknown(name, place)
                source = where or by_name[name].env
                values[name] = coerce(by_name[name], value, place or source)
            except error as exc:
                problems.found.append(str(exc))
                continue
            sources[name] = source
            problems.places[name] = place or source
    return values, sources, problems
