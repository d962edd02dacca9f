"""The TOML file `trio-drain run` reads: a [drain] table and [[mesh]] tables,
checked whole before anything starts (SPEC section 8).

Every mistake is one line, in one style: ``config PATH: WHERE: WHAT``, where
WHERE is ``[drain]`` or ``[[mesh]] #N (slug)``. A value of the wrong type
is reported as a wrong type (``mesh_id must be a string, got an integer``),
never as missing; a secret key's value is never quoted.
"""

from __future__ import annotations

import datetime
import tomllib
import typing
from pathlib import Path
from typing import Any, NoReturn

import attrs

from .._brokers._identity import signing_key
from .._brokers._url import check_broker_url
from .._config import DrainConfig
from .._display import bounded
from .._errors import ConfigError

#: The keys of a [[mesh]] table: those it must have, then those it may.
_MESH_REQUIRED = ("slug", "mesh_id", "member_id", "broker_url")
_MESH_OPTIONAL = ("secret_key", "secret_key_file")
#: Keys whose values an error never quotes.
_SECRET = frozenset({"secret_key"})


def load_config(path: str) -> tuple[DrainConfig, list[dict[str, Any]]]:
    """Read and check a config file.

    Unknown sections or keys are errors, like wrong types; a
    `secret_key_file` is read (relative to the config) into `secret_key`.

    Args:
        path: The TOML file.

    Returns:
        The drain settings and the mesh tables, each with a `secret_key`.

    Raises:
        ConfigError: The file cannot be read or is not a valid config.
    """
    config = _Config(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        config.fail(f"cannot read config file: {exc.strerror}")
    except UnicodeDecodeError:
        config.fail("not valid TOML: the file is not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        config.fail(f"not valid TOML: {exc}")
    unknown = sorted(set(data) - {"drain", "mesh"})
    if unknown:
        config.fail(f"unknown section(s) {_names(unknown)} (a config has [drain] and [[mesh]])")
    drain = data.get("drain", {})
    if not isinstance(drain, dict):
        config.fail(f"[drain] must be a table, got {_kind(drain)}")
    settings = config.drain(drain)
    meshes = data.get("mesh", [])
    if isinstance(meshes, dict):
        config.fail("[mesh] must be an array of tables: write [[mesh]]")
    if not isinstance(meshes, list) or not meshes:
        config.fail("at least one [[mesh]] table is required")
    seen: dict[str, int] = {}
    for number, mesh in enumerate(meshes, 1):
        config.mesh(number, mesh, seen)
    return settings, meshes


class _Config:
    """One file's checks, each failing in the one style."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base = Path(path).parent

    def fail(self, message: str, where: str = "") -> NoReturn:
        prefix = f"config {bounded(self.path, 200)}: " + (f"{where}: " if where else "")
        raise ConfigError(prefix + message)

    def drain(self, table: dict[str, Any]) -> DrainConfig:
        types = _drain_types()
        unknown = sorted(set(table) - set(types))
        if unknown:
            self.fail(f"unknown key(s) {_names(unknown)}", "[drain]")
        for key, value in table.items():
            wanted = _wrong_type(value, types[key])
            if wanted is not None:
                self.fail(f"{key} must be {wanted}, got {_kind(value)} ({_quote(value)})", "[drain]")
        try:
            return DrainConfig.from_mapping(table)
        except ConfigError as exc:
            self.fail(str(exc), "[drain]")

    def mesh(self, number: int, mesh: object, seen: dict[str, int]) -> None:
        where = f"[[mesh]] #{number}"
        if not isinstance(mesh, dict):
            self.fail(f"must be a table, got {_kind(mesh)}", where)
        slug = mesh.get("slug")
        if isinstance(slug, str) and slug:
            where += f" ({bounded(slug, 60)})"
        unknown = sorted(set(mesh) - set(_MESH_REQUIRED) - set(_MESH_OPTIONAL))
        if unknown:
            self.fail(f"unknown key(s) {_names(unknown)}", where)
        for key, value in mesh.items():
            if not isinstance(value, str):
                shown = "" if key in _SECRET else f" ({_quote(value)})"
                self.fail(f"{key} must be a string, got {_kind(value)}{shown}", where)
            if not value.strip():
                self.fail(f"{key} must not be empty", where)
        missing = [k for k in _MESH_REQUIRED if k not in mesh]
        if missing:
            self.fail(f"missing {', '.join(missing)}", where)
        if mesh["slug"] in seen:
            self.fail(
                f"the slug {bounded(mesh['slug'], 60)} is taken by [[mesh]] #{seen[mesh['slug']]}", where
            )
        seen[mesh["slug"]] = number
        try:
            check_broker_url(mesh["broker_url"])
        except ConfigError as exc:
            self.fail(str(exc), where)
        if "secret_key_file" in mesh:
            if "secret_key" in mesh:
                self.fail("give secret_key or secret_key_file, not both", where)
            key_path = self.base / mesh["secret_key_file"]
            try:
                mesh["secret_key"] = key_path.read_text().strip()
            except OSError as exc:
                self.fail(f"cannot read secret_key_file {bounded(str(key_path), 200)}: {exc.strerror}", where)
            except UnicodeDecodeError:
                self.fail(f"secret_key_file {bounded(str(key_path), 200)} is not text", where)
        if "secret_key" not in mesh:
            self.fail("missing secret_key (or secret_key_file)", where)
        try:
            signing_key(mesh["secret_key"], what="secret key")
        except ConfigError as exc:
            self.fail(str(exc), where)


def _drain_types() -> dict[str, Any]:
    """Each [drain] key (a DrainConfig field) and the type it takes."""
    hints = typing.get_type_hints(DrainConfig)
    return {field.name: hints.get(field.name, Any) for field in attrs.fields(DrainConfig)}


def _wrong_type(value: object, wanted: Any) -> str | None:
    """What `value` should have been, if it is not of the type `wanted`;
    None if it is (or the type is not one a TOML value is checked against:
    the field's own check judges it)."""
    if wanted is bool:
        return None if isinstance(value, bool) else "true or false"
    if wanted is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if wanted is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if typing.get_origin(wanted) is typing.Literal:
        return None if isinstance(value, str) else "one of " + ", ".join(map(repr, typing.get_args(wanted)))
    if wanted is str:
        return None if isinstance(value, str) else "a string"
    return None


def _kind(value: object) -> str:
    """The TOML type of `value`, for an error."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return "a date or time"
    return type(value).__name__


def _quote(value: object) -> str:
    if isinstance(value, str):
        return bounded(repr(value), 60)
    return bounded(str(value).lower() if isinstance(value, bool) else str(value), 60)


def _names(keys: list[str]) -> str:
    return ", ".join(bounded(str(k), 60) for k in keys)
