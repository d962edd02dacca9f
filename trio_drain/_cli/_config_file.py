"""The TOML file `trio-drain run` reads: a [drain] table and [[mesh]] tables,
checked whole before anything starts (SPEC section 8)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .._brokers._identity import signing_key
from .._brokers._url import check_broker_url
from .._config import DrainConfig
from .._errors import ConfigError

_MESH_KEYS = frozenset({"slug", "mesh_id", "member_id", "broker_url", "secret_key", "secret_key_file"})


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
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"drain", "mesh"})
    if unknown:
        raise ConfigError(f"config {path}: unknown section(s) {', '.join(unknown)}")
    drain = data.get("drain", {})
    if not isinstance(drain, dict):
        raise ConfigError("config: [drain] must be a table")
    config = DrainConfig.from_mapping(drain)
    meshes = data.get("mesh", [])
    if not isinstance(meshes, list) or not meshes:
        raise ConfigError(f"config {path}: at least one [[mesh]] is required")
    base = Path(path).parent
    slugs: set[str] = set()
    for m in meshes:
        if not isinstance(m, dict):
            raise ConfigError("config: each [[mesh]] must be a table")
        unknown = sorted(set(m) - _MESH_KEYS)
        if unknown:
            raise ConfigError(
                f"config: [[mesh]] {m.get('slug', '?')}: unknown key(s) {', '.join(map(str, unknown))}"
            )
        missing = [
            k
            for k in ("slug", "mesh_id", "member_id", "broker_url")
            if not isinstance(m.get(k), str) or not m[k]
        ]
        if missing:
            raise ConfigError(f"config: [[mesh]] {m.get('slug', '?')} is missing {', '.join(missing)}")
        if m["slug"] in slugs:
            raise ConfigError(f"config: two [[mesh]] tables have the slug {m['slug']}")
        slugs.add(m["slug"])
        try:
            check_broker_url(m["broker_url"])
        except ConfigError as exc:
            raise ConfigError(f"config: [[mesh]] {m['slug']}: {exc}") from None
        if "secret_key_file" in m:
            key_path = base / str(m["secret_key_file"])
            try:
                m["secret_key"] = key_path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"config: cannot read secret_key_file {key_path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"config: secret_key_file {key_path} is not text") from None
        if "secret_key" not in m:
            raise ConfigError(f"config: [[mesh]] {m['slug']} needs secret_key or secret_key_file")
        signing_key(str(m["secret_key"]), what=f"secret key of mesh {m['slug']}")
    return config, meshes
