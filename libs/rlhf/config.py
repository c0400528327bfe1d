"""Typed configuration from environment variables: one frozen dataclass per service.

Each field is declared with `setting(env, default, help)`. `load_config` parses the environment
by the field's type and names the variable in every error; `parse_args` gives each service a
`--help` that lists its variables, defaults and meaning.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """An environment variable has a value the service cannot use."""


def setting(env: str, default: Any, help: str, secret: bool = False) -> Any:
    """Declare a config field read from environment variable `env`."""
    return field(default=default, metadata={"env": env, "help": help, "secret": secret})


def _parse(env: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            if raw.strip().lower() in _TRUE:
                return True
            if raw.strip().lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw).expanduser()
        if kind is str:
            return raw
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{env}={raw!r}: {exc}") from exc
    raise TypeError(f"{env}: unsupported config type {kind!r}")


def load_config(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from the environment; unset variables keep their defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        env = f.metadata["env"]
        if env in environ:
            values[f.name] = _parse(env, environ[env], hints[f.name])
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """(variable, type, default, help) for every setting: used by --help and the docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else ""
        shown = "(secret)" if f.metadata.get("secret") else str(default)
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        rows.append((f.metadata["env"], kind, shown, f.metadata["help"]))
    return rows


def parse_args(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    """A --help that lists the environment variables, then the config from the environment."""
    lines = ["configuration (environment variables):"]
    for env, kind, default, help_text in describe(cls):
        lines.append(f"  {env}  [{kind}, default: {default}]\n      {help_text}")
    parser = argparse.ArgumentParser(
        description=description,
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        return load_config(cls)
    except ConfigError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlhf"


@dataclass(frozen=True)
class CommonConfig:
    """Settings every service shares."""

    kafka_bootstrap: str = setting(
        "RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers, host:port[,host:port]"
    )
    checkpoint_dir: Path = setting(
        "RLHF_CHECKPOINT_DIR",
        _default_cache() / "checkpoints",
        "checkpoint store root (a shared volume in a cluster)",
    )
    cache_dir: Path = setting(
        "RLHF_CACHE_DIR", _default_cache(), "where converted base models are cached"
    )
    grpc_host: str = setting("RLHF_GRPC_HOST", "0.0.0.0", "address the gRPC server binds")
    grpc_port: int = setting("RLHF_GRPC_PORT", 50051, "gRPC port (0 = any)")
    metrics_port: int = setting("RLHF_METRICS_PORT", 0, "Prometheus /metrics port (0 = any)")
    shutdown_grace_seconds: float = setting(
        "RLHF_SHUTDOWN_GRACE_SECONDS", 10.0, "how long SIGTERM waits for in-flight requests"
    )
    publish_timeout_seconds: float = setting(
        "RLHF_PUBLISH_TIMEOUT_SECONDS", 5.0, "how long to wait for the broker to acknowledge"
    )
    tls_cert_file: str = setting(
        "RLHF_TLS_CERT_FILE", "", "PEM certificate chain: with RLHF_TLS_KEY_FILE, serve TLS only"
    )
    tls_key_file: str = setting(
        "RLHF_TLS_KEY_FILE", "", "PEM private key of RLHF_TLS_CERT_FILE (empty = plaintext)"
    )
