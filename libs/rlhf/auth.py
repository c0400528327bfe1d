"""API keys per tenant, presented as gRPC metadata `authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class Unauthenticated(Exception):
    """No key, or a key that belongs to no tenant."""


class ApiKeys:
    def __init__(self, keys_by_tenant: dict[str, str]) -> None:
        for tenant, key in keys_by_tenant.items():
            if len(key) < 16:
                raise ValueError(f"API key for tenant {tenant!r} is shorter than 16 characters")
        self._keys = dict(keys_by_tenant)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ApiKeys:
        """Entries look like `tenant=key` (from a comma separated environment variable)."""
        keys = {}
        for entry in entries:
            tenant, sep, key = entry.partition("=")
            if not sep or not tenant or not key:
                raise ValueError("API keys must look like tenant=key")
            keys[tenant.strip()] = key.strip()
        return cls(keys)

    def tenant_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The tenant whose key is in the authorization header; raises Unauthenticated."""
        header = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        presented = header[len("Bearer ") :].strip().encode()
        tenant = None
        for name, key in self._keys.items():
            # Compare against every key so timing does not reveal which tenant matched.
            if hmac.compare_digest(presented, key.encode()):
                tenant = name
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant
