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
class KafkaSettings:
    """How every Kafka client of the process connects (`rlhf.bus`): plaintext by default, or
    TLS and SASL as the cluster requires."""

    security_protocol: str = setting(
        "RLHF_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    )
    sasl_mechanism: str = setting(
        "RLHF_KAFKA_SASL_MECHANISM",
        "SCRAM-SHA-512",
        "with SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
    )
    sasl_username: str = setting("RLHF_KAFKA_SASL_USERNAME", "", "with SASL: the user name")
    sasl_password: str = setting(
        "RLHF_KAFKA_SASL_PASSWORD", "", "with SASL: the password", secret=True
    )
    ssl_ca_file: str = setting(
        "RLHF_KAFKA_SSL_CA_FILE",
        "",
        "with SSL: PEM CA bundle the brokers' certificates are verified against (empty = the "
        "system's)",
    )
    ssl_cert_file: str = setting(
        "RLHF_KAFKA_SSL_CERT_FILE", "", "with SSL: PEM client certificate, if the brokers ask"
    )
    ssl_key_file: str = setting(
        "RLHF_KAFKA_SSL_KEY_FILE", "", "with SSL: PEM private key of RLHF_KAFKA_SSL_CERT_FILE"
    )

    def validate(self) -> None:
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ConfigError(f"RLHF_KAFKA_SECURITY_PROTOCOL must be one of {protocols}")
        if self.security_protocol.startswith("SASL"):
            mechanisms = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
            if self.sasl_mechanism not in mechanisms:
                raise ConfigError(f"RLHF_KAFKA_SASL_MECHANISM must be one of {mechanisms}")
            if not self.sasl_username or not self.sasl_password:
                raise ConfigError(
                    "SASL needs RLHF_KAFKA_SASL_USERNAME and RLHF_KAFKA_SASL_PASSWORD"
                )
        if bool(self.ssl_cert_file) != bool(self.ssl_key_file):
            raise ConfigError("set both RLHF_KAFKA_SSL_CERT_FILE and RLHF_KAFKA_SSL_KEY_FILE")
        for name in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"RLHF_KAFKA_{name.upper()}={path!r} is not a readable file")

    def client_options(self) -> dict[str, Any]:
        """kafka-python keyword arguments for producers, consumers and admin clients."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            options["ssl_check_hostname"] = True
            if self.ssl_ca_file:
                options["ssl_cafile"] = self.ssl_ca_file
            if self.ssl_cert_file:
                options.update(ssl_certfile=self.ssl_cert_file, ssl_keyfile=self.ssl_key_file)
        return options


@dataclass(frozen=True)
class AuthSettings:
    """The keys this service accepts (`rlhf.auth`: service, reader and operator roles; apps'
    keys are the service's own settings) and the one it presents to other services."""

    service_keys: tuple[str, ...] = setting(
        "RLHF_SERVICE_KEYS",
        (),
        "name=key pairs (keys 16+ chars) of the platform's own callers this service accepts: "
        "trainer -> reward (Score), trainer -> generation (rollouts); a name may repeat (rotation)",
        secret=True,
    )
    reader_keys: tuple[str, ...] = setting(
        "RLHF_READER_KEYS",
        (),
        "name=key pairs of read-only callers: trainer status and checkpoints, policy and reward "
        "model info, /metrics",
        secret=True,
    )
    operator_keys: tuple[str, ...] = setting(
        "RLHF_OPERATOR_KEYS",
        (),
        "name=key pairs of operators: what readers may, and Pause, Resume, Checkpoint, Rollback",
        secret=True,
    )
    client_key: str = setting(
        "RLHF_CLIENT_KEY",
        "",
        "the key this process presents when it calls other services: the trainer one of their "
        "RLHF_SERVICE_KEYS, the playground's panel a reader key",
        secret=True,
    )
    metrics_open: bool = setting(
        "RLHF_METRICS_OPEN",
        False,
        "serve /metrics to anyone; by default it needs a reader, operator or service key",
    )

    def validate(self) -> None:
        from rlhf.auth import MIN_KEY_CHARS

        try:
            self.credentials()
        except ValueError as exc:
            raise ConfigError(
                f"RLHF_SERVICE_KEYS, RLHF_READER_KEYS, RLHF_OPERATOR_KEYS: {exc}"
            ) from exc
        if self.client_key and len(self.client_key) < MIN_KEY_CHARS:
            raise ConfigError(f"RLHF_CLIENT_KEY must be at least {MIN_KEY_CHARS} characters")

    def credentials(self) -> Any:
        """The service, reader and operator keys as `rlhf.auth.Credentials`."""
        from rlhf.auth import OPERATOR, READER, SERVICE, Credentials

        return (
            Credentials.parse(SERVICE, self.service_keys)
            | Credentials.parse(READER, self.reader_keys)
            | Credentials.parse(OPERATOR, self.operator_keys)
        )


@dataclass(frozen=True)
class TlsSettings:
    """This process's TLS identity, and the CA its peers' certificates are checked against."""

    tls_cert_file: str = setting(
        "RLHF_TLS_CERT_FILE",
        "",
        "PEM certificate chain: with RLHF_TLS_KEY_FILE, serve TLS only (gRPC, HTTP, /metrics); "
        "also the client certificate presented to other services when they require one",
    )
    tls_key_file: str = setting(
        "RLHF_TLS_KEY_FILE", "", "PEM private key of RLHF_TLS_CERT_FILE (empty = plaintext)"
    )
    tls_ca_file: str = setting(
        "RLHF_TLS_CA_FILE",
        "",
        "PEM CA bundle: calls to other services use TLS verified against it (empty = "
        "plaintext calls), and with RLHF_TLS_CLIENT_AUTH callers' certificates are checked "
        "against it",
    )
    tls_client_auth: bool = setting(
        "RLHF_TLS_CLIENT_AUTH",
        False,
        "mutual TLS: every TLS port requires a client certificate signed by RLHF_TLS_CA_FILE",
    )
    tls_server_name: str = setting(
        "RLHF_TLS_SERVER_NAME",
        "",
        "name other services' certificates are checked for (empty = the host dialled)",
    )


@dataclass(frozen=True)
class CommonConfig(TlsSettings):
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
    grpc_host: str = setting(
        "RLHF_GRPC_HOST",
        "127.0.0.1",
        "address the gRPC, HTTP and /metrics servers bind (0.0.0.0 = every interface)",
    )
    grpc_port: int = setting("RLHF_GRPC_PORT", 50051, "gRPC port (0 = any)")
    metrics_port: int = setting("RLHF_METRICS_PORT", 0, "Prometheus /metrics port (0 = any)")
    health_port: int = setting(
        "RLHF_HEALTH_PORT",
        -1,
        "a plaintext port serving only gRPC health checks, for probes that cannot speak TLS "
        "(0 = any, -1 = none)",
    )
    max_calls: int = setting(
        "RLHF_MAX_CALLS",
        32,
        "gRPC calls served at once (each holds a thread); more wait up to "
        "RLHF_CALL_SLOT_WAIT_MS for a slot, then get RESOURCE_EXHAUSTED. Health checks have "
        "threads of their own",
    )
    call_slot_wait_ms: int = setting(
        "RLHF_CALL_SLOT_WAIT_MS",
        100,
        "how long a gRPC call that finds every call slot busy waits for one before it is "
        "RESOURCE_EXHAUSTED (0 = refused at once); at most RLHF_MAX_CALLS calls wait, each on a "
        "thread of its own, and one more is refused at once",
    )
    read_timeout_seconds: float = setting(
        "RLHF_READ_TIMEOUT_SECONDS",
        10.0,
        "longest a client may take to send a request (gRPC request message, HTTP headers and "
        "body) or stay silent between the messages of a stream",
    )
    shutdown_grace_seconds: float = setting(
        "RLHF_SHUTDOWN_GRACE_SECONDS", 10.0, "how long SIGTERM waits for in-flight requests"
    )
    publish_timeout_seconds: float = setting(
        "RLHF_PUBLISH_TIMEOUT_SECONDS", 5.0, "how long to wait for the broker to acknowledge"
    )
    nice: int = setting(
        "RLHF_NICE",
        0,
        "scheduling priority the process gives itself at start (os.nice, 0-19): on a node it "
        "shares with serving, give training a high value so answers stay fast",
    )
    heap_keep_mb: int = setting(
        "RLHF_HEAP_KEEP_MB",
        256,
        "freed memory (MiB) the C heap keeps for reuse instead of returning it to the OS, with "
        "blocks up to 32 MiB taken from the heap (glibc malloc; 0 = glibc's own adaptive "
        "policy): a forward pass then reuses its activation memory instead of faulting it in "
        "afresh on every call. 0-2047",
    )
    auth: AuthSettings = group(AuthSettings, "credentials")
    kafka: KafkaSettings = group(KafkaSettings, "Kafka connection security")

    def validate(self) -> None:
        if not 0 <= self.heap_keep_mb < 2048:
            raise ConfigError(f"RLHF_HEAP_KEEP_MB={self.heap_keep_mb}: expected 0 to 2047")
        if self.max_calls < 1 or self.read_timeout_seconds <= 0:
            raise ConfigError("RLHF_MAX_CALLS must be >= 1 and RLHF_READ_TIMEOUT_SECONDS > 0")
        if self.call_slot_wait_ms < 0:
            raise ConfigError("RLHF_CALL_SLOT_WAIT_MS must be >= 0")
        if self.tls_client_auth and not self.tls_ca_file:
            raise ConfigError("RLHF_TLS_CLIENT_AUTH needs RLHF_TLS_CA_FILE")


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
        "HMAC key that signs new generation ids (generation) and verifies them (feedback), "
        "16+ bytes; every id names its key by a key id derived from it",
        secret=True,
    )
    generation_id_verify_keys: tuple[str, ...] = setting(
        "RLHF_GENERATION_ID_VERIFY_KEYS",
        (),
        "comma separated further keys that verify ids but never sign: the previous key after a "
        "rotation (until its ids expire), or the next one before it signs",
        secret=True,
    )

    def check_generation_id_keys(self) -> None:
        if len(self.generation_id_key.encode()) < 16:
            raise ConfigError("RLHF_GENERATION_ID_KEY must be set to at least 16 bytes")
        if any(len(key.encode()) < 16 for key in self.generation_id_verify_keys):
            raise ConfigError("every RLHF_GENERATION_ID_VERIFY_KEYS key needs 16+ bytes")

    def generation_id_keys(self) -> tuple[bytes, list[bytes]]:
        """The signing key and the keys that only verify."""
        return self.generation_id_key.encode(), [k.encode() for k in self.generation_id_verify_keys]


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
