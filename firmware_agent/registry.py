"""The machinery behind a settings registry, shared by the agent and the aggregator.

Each side declares its settings (dotted name, default, help, whether secret) and the prefix
of its environment variables; :func:`resolve` layers defaults, a TOML file, the environment
and command-line overrides, in that order, and says where each value came from. Unknown
keys and values of the wrong type raise the caller's error class, naming the setting, the
bad value and its source. Standard library only: the aggregator imports it too.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Setting", "resolve"]


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


def resolve(
    settings: Sequence[Setting],
    path: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, object],
    error: type[Exception],
) -> tuple[dict[str, int | str], dict[str, str]]:
    """(values, sources) by name: defaults, then ``path``, then ``environ``, then overrides."""
    by_name = {s.name: s for s in settings}

    def unknown(name: str, where: str) -> Exception:
        hint = difflib.get_close_matches(name, by_name, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        return error(f"{where}: unknown setting {name!r}{did_you_mean}")

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
    if path is not None:
        try:
            table = tomllib.loads(path.read_text())
        except OSError as exc:
            raise error(f"{path}: cannot read config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise error(f"{path}: not valid TOML: {exc}") from exc
        layers.append((str(path), _flatten(table)))
    layers.append(("", {s.name: environ[s.env] for s in settings if s.env in environ}))
    layers.append(("command line", overrides))
    for where, layer in layers:
        for name, value in layer.items():
            if name not in by_name:
                raise unknown(name, where)
            source = where or by_name[name].env
            values[name] = coerce(by_name[name], value, source)
            sources[name] = source
    return values, sources
