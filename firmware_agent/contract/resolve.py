"""The machinery behind a settings registry, shared by the agent and the aggregator.

Each side declares its settings (dotted name, default, help, whether secret) and the prefix
of its environment variables; :func:`resolve` layers defaults, a TOML file, the environment
and command-line overrides, in that order, and says where each value came from. Unknown
keys and values of the wrong type raise the caller's error class, naming the setting, the
bad value and its source: for a file, its line, table and key (``agent.toml line 12, [count]
window_s``). Given a ``problems`` list, :func:`resolve` appends every mistake to it instead
of raising at the first, so a caller can report them all at once (:func:`report`).
Standard library only: the aggregator imports it too.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Setting", "report", "resolve"]

_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: int | str
    help: str
    secret: bool = False
    env_prefix: str = "FOOTFALL_"

    @property
    def env(self) -> str:
        return self.env_prefix + self.name.upper().replace(".", "_")


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
    *,
    problems: list[str] | None = None,
    places: dict[str, str] | None = None,
) -> tuple[dict[str, int | str], dict[str, str]]:
    """(values, sources) by name: defaults, then ``path``, then ``environ``, then overrides.
    ``places`` (filled when given) says where each value set by a file is: its line, table and
    key. With ``problems``, mistakes are appended to it (the setting keeps its default)."""
    by_name = {s.name: s for s in settings}
    where_set = {} if places is None else places
    found: list[str] = []

    def unknown(name: str, where: str) -> Exception:
        hint = difflib.get_close_matches(name, by_name, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        allowed = "" if hint else " (the settings are listed by 'config show --help-text')"
        return error(f"{where}: unknown setting {name!r}{did_you_mean}{allowed}")

    def coerce(setting: Setting, value: object, where: str) -> int | str:
        if isinstance(setting.default, int):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    pass
            raise error(f"{setting.name} must be an integer, got {value!r} (from {where})")
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            return str(value)  # a TOML number for a text setting (the calibration's) too
        raise error(f"{setting.name} must be a string, got {value!r} (from {where})")

    values: dict[str, int | str] = {s.name: s.default for s in settings}
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
                found.append(str(exc))
                continue
            sources[name] = source
            where_set[name] = place or source
    if found and problems is None:
        raise error(report(found, "the settings"))
    if problems is not None:
        problems.extend(found)
    return values, sources
