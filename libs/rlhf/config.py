"""Typed configuration from environment variables: one frozen dataclass per service.

Each field is declared with `setting(env, default, help)`, once: settings that several services
read (the policy model, the reward model, ...) live in small shared classes here that the
services' configs inherit, and an algorithm's knobs live beside the algorithm (e.g.
`rlhf.training.ppo_config.PPOConfig`) and are nested into a service's config with
`group(cls, title)`. `load_config` parses the environment by each field's type, nested groups
included, and names the variable in every error; `parse_args` gives each service a `--help` that
lists its variables, defaults and meaning, group by group.
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


def group(cls: type, title: str) -> Any:
    """Declare a config field holding another settings class (its own variables, validated by
    its own `validate`), e.g. an algorithm's knobs inside a service's config."""
    return field(default_factory=cls, metadata={"group": title})


def _is_group(f: Any) -> bool:
    return "group" in f.metadata


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
        if _is_group(f):
            values[f.name] = load_config(hints[f.name], environ)
            continue
        env = f.metadata["env"]
        if env in environ:
            values[f.name] = _parse(env, environ[env], hints[f.name])
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


Row = tuple[str, str, str, str]  # (variable, type, default as shown, help)


def sections(
    cls: type, title: str = "", seen: set[str] | None = None
) -> list[tuple[str, list[Row]]]:
    """The settings of `cls` as (title, rows) sections: its own fields under `title`, then
    each nested group under the group's title, recursively. A variable several groups read
    (a shared setting such as RLHF_SEED) is listed once, where it first appears."""
    seen = set() if seen is None else seen
    hints = typing.get_type_hints(cls)
    own: list[Row] = []
    nested: list[tuple[str, list[Row]]] = []
    for f in fields(cls):
        if _is_group(f):
            nested += sections(hints[f.name], f.metadata["group"], seen)
            continue
        if f.metadata["env"] in seen:
            continue
        seen.add(f.metadata["env"])
        default = f.default if f.default is not MISSING else ""
        shown = "(secret)" if f.metadata.get("secret") else str(default)
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        own.append((f.metadata["env"], kind, shown, f.metadata["help"]))
    return [(title, own), *nested] if own else nested


def describe(cls: type) -> list[Row]:
    """(variable, type, default, help) for every setting, nested groups included: used by
    --help and the docs."""
    return [row for _, rows in sections(cls) for row in rows]


def parse_args(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    """A --help that lists the environment variables, then the config from the environment."""
    lines = []
    for title, rows in sections(cls):
        lines.append(f"{title}:" if title else "configuration (environment variables):")
        for env, kind, default, help_text in rows:
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
    nice: int = setting(
        "RLHF_NICE",
        0,
        "scheduling priority the process gives itself at start (os.nice, 0-19): on a node it "
        "shares with serving, give training a high value so answers stay fast",
    )


# Settings several services read, declared once; a service's config inherits the ones it uses.


@dataclass(frozen=True)
class PolicyModelSettings:
    policy_model: str = setting(
        "RLHF_POLICY_MODEL", "smollm2-135m", "base policy: smollm2-135m, or tiny-random for tests"
    )


@dataclass(frozen=True)
class RewardModelSettings:
    reward_model: str = setting(
        "RLHF_REWARD_MODEL", "minilm-l6", "reward backbone: minilm-l6, or tiny-random for tests"
    )


@dataclass(frozen=True)
class RewardTokenSettings:
    reward_max_tokens: int = setting(
        "RLHF_REWARD_MAX_TOKENS",
        256,
        "(prompt, answer) pairs are truncated to this many tokens for the reward model, in "
        "training and scoring alike",
    )


@dataclass(frozen=True)
class GenerationIdSettings:
    generation_id_key: str = setting(
        "RLHF_GENERATION_ID_KEY",
        "",
        "HMAC key that signs (generation) and verifies (feedback) generation ids, 16+ bytes",
        secret=True,
    )


@dataclass(frozen=True)
class ConsumerSettings:
    max_poll_interval_ms: int = setting(
        "RLHF_KAFKA_MAX_POLL_INTERVAL_MS", 10000, "consumer group liveness bound (Kafka setting)"
    )


@dataclass(frozen=True)
class SeedSettings:
    seed: int = setting("RLHF_SEED", 0, "seed for sampling, shuffling and simulated users' choices")


@dataclass(frozen=True)
class GenerationAddressSettings:
    generation_address: str = setting(
        "RLHF_GENERATION_ADDRESS", "127.0.0.1:50051", "host:port of the generation service (gRPC)"
    )
