"""Who may call what: the one credential mechanism of every service.

A caller presents a key as `authorization: Bearer <key>` (gRPC metadata or an HTTP header). A
server knows the keys it accepts (`Credentials`), each naming a principal: a role and a name.

- `app`: a tenant's application; generates and submits feedback (its name is the tenant);
- `service`: the platform's own callers; score, sample trainer rollouts, generate;
- `reader`: dashboards, Prometheus, watchers; trainer status and checkpoints, policy and reward
  model info, /metrics;
- `operator`: people steering the trainer; what a reader may, and pause, resume, checkpoint and
  roll back.

Each service declares an `Access` rule per gRPC method (`rules`); the server bootstrap
(`rlhf.server`) checks it before the request is read: no key or an unknown one is
UNAUTHENTICATED, a known key of the wrong role PERMISSION_DENIED. Several keys may name the same
principal, which is how a key is rotated: add the new key, move callers to it, remove the old.
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

APP, SERVICE, READER, OPERATOR = "app", "service", "reader", "operator"
ROLES = (APP, SERVICE, READER, OPERATOR)
MIN_KEY_CHARS = 16
# Tenant and caller names: they travel inside generation ids and metric labels.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Unauthenticated(Exception):
    """No key, or a key that belongs to nobody."""


class PermissionDenied(Exception):
    """A known key whose role may not do this."""


@dataclass(frozen=True)
class Principal:
    """Who presented a key: their role, and their name (an app's name is its tenant)."""

    role: str
    name: str


def bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key in `authorization: Bearer <key>`, or None."""
    header = next((v for k, v in metadata if k == "authorization"), None)
    if not isinstance(header, str) or not header.startswith("Bearer "):
        return None
    return header[len("Bearer ") :].strip()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Credentials:
    """The keys a server accepts, each naming a principal. Keys are held as SHA-256 digests and
    looked up by digest, so neither the stored keys nor the lookup's timing reveal a key."""

    def __init__(self, entries: Iterable[tuple[str, str, str]] = ()) -> None:
        """`entries`: (role, name, key). A key listed twice is a configuration error, even for
        the same principal (one of the two was meant to be another key)."""
        self._by_digest: dict[bytes, Principal] = {}
        for role, name, key in entries:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
            if not NAME.fullmatch(name):
                raise ValueError(
                    f"name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (a letter or "
                    "digit first)"
                )
            if len(key) < MIN_KEY_CHARS:
                raise ValueError(f"the key of {role} {name!r} is shorter than {MIN_KEY_CHARS}")
            digest = _digest(key)
            if digest in self._by_digest:
                raise ValueError(f"a key of {role} {name!r} is listed twice")
            self._by_digest[digest] = Principal(role, name)

    @classmethod
    def parse(cls, role: str, entries: Iterable[str]) -> Credentials:
        """Keys of one role from `name=key` entries (a comma separated environment variable).
        A name may appear several times: each of its keys is accepted (rotation)."""
        parsed = []
        for entry in entries:
            name, sep, key = entry.partition("=")
            if not sep or not name.strip() or not key.strip():
                raise ValueError(f"{role} keys must look like name=key")
            parsed.append((role, name.strip(), key.strip()))
        return cls(parsed)

    def __or__(self, other: Credentials) -> Credentials:
        merged = Credentials()
        for source in (self, other):
            for digest, principal in source._by_digest.items():
                if digest in merged._by_digest:
                    raise ValueError(
                        f"one key is both {merged._by_digest[digest].role} "
                        f"{merged._by_digest[digest].name!r} and {principal.role} "
                        f"{principal.name!r}"
                    )
                merged._by_digest[digest] = principal
        return merged

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def names(self, role: str) -> set[str]:
        return {p.name for p in self._by_digest.values() if p.role == role}

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The principal whose key is in the authorization header; raises Unauthenticated."""
        key = bearer(metadata)
        if key is None:
            raise Unauthenticated("missing 'authorization: Bearer <key>'")
        principal = self._by_digest.get(_digest(key))
        if principal is None:
            raise Unauthenticated("unknown key")
        return principal

    def tenant_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The tenant of an app key; raises Unauthenticated (also for keys of other roles)."""
        principal = self.identify(metadata)
        if principal.role != APP:
            raise Unauthenticated(f"a {principal.role} key is not an app key")
        return principal.name


@dataclass(frozen=True)
class Access:
    """Who may call one method: any of `roles` (an operator may do what a reader may), or
    anyone, credential or not, when `open`."""

    roles: frozenset[str] = frozenset()
    open: bool = False

    def check(self, principal: Principal) -> None:
        """Raises PermissionDenied unless `principal` may call."""
        if self.open or principal.role in self.roles:
            return
        if principal.role == OPERATOR and READER in self.roles:
            return
        raise PermissionDenied(
            f"{principal.role} {principal.name!r} may not call this (needs {sorted(self.roles)})"
        )


OPEN = Access(open=True)


def allow(*roles: str) -> Access:
    return Access(frozenset(roles))


# Methods no service lists are for operators only: a method added without a rule is closed.
DEFAULT_ACCESS = allow(OPERATOR)


def rules(service: str, by_method: Mapping[str, Access]) -> dict[str, Access]:
    """Rules keyed by gRPC method path (`/package.Service/Method`), from short method names."""
    return {f"/{service}/{method}": access for method, access in by_method.items()}


_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "rlhf_caller", default=None
)


def caller() -> Principal | None:
    """Who is calling the running gRPC handler (set by the server bootstrap); None when the
    method is open and no known key came."""
    return _CALLER.get()


def set_caller(principal: Principal | None) -> None:
    _CALLER.set(principal)


# -- the calling side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    """How this process calls another service: the key it presents (RLHF_CLIENT_KEY, an app's
    or an operator's) and TLS: servers verified against `ca_file` (empty: plaintext), this
    process's certificate presented when they ask for one (mutual TLS)."""

    key: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    @classmethod
    def of(cls, settings: Any, key: str | None = None) -> ClientSecurity:
        """From a config with the TLS settings (`rlhf.config.TlsSettings`), presenting `key`,
        or the config's RLHF_CLIENT_KEY when None."""
        if key is None:
            key = settings.auth.client_key
        return cls(
            key,
            settings.tls_ca_file,
            settings.tls_cert_file,
            settings.tls_key_file,
            settings.tls_server_name,
        )

    def with_key(self, key: str) -> ClientSecurity:
        return replace(self, key=key)


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call of a channel."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


def dial(address: str, security: ClientSecurity = ClientSecurity()) -> grpc.Channel:
    """A channel to another service, presenting `security.key` on every call, over TLS when
    `security.ca_file` is set (with this process's certificate for mutual TLS)."""
    if security.ca_file:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(security.ca_file).read_bytes(),
            private_key=Path(security.key_file).read_bytes() if security.key_file else None,
            certificate_chain=Path(security.cert_file).read_bytes() if security.cert_file else None,
        )
        options = []
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, credentials, options)
    else:
        channel = grpc.insecure_channel(address)
    if security.key:
        return grpc.intercept_channel(channel, _Bearer(security.key))
    return channel
