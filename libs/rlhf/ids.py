"""Unforgeable generation ids: an HMAC-signed token carrying the policy version and issue time.

The feedback service verifies a token without a database lookup: a wrong signature is a forgery,
an old issue time is expired. Format: `g1.<base64url(payload)>.<base64url(hmac-sha256)>` with
payload `<uuid hex>:<policy version>:<unix seconds>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass

PREFIX = "g1"
MAX_ID_LENGTH = 256


class InvalidGenerationId(ValueError):
    """Not a generation id at all (malformed)."""


class ForgedGenerationId(InvalidGenerationId):
    """Well formed but not signed with our key."""


class ExpiredGenerationId(InvalidGenerationId):
    """Signed by us but older than the accepted age."""


@dataclass(frozen=True)
class GenerationClaims:
    nonce: str
    policy_version: int
    issued_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GenerationIdSigner:
    def __init__(self, key: bytes, max_age_seconds: float = 7 * 24 * 3600) -> None:
        if len(key) < 16:
            raise ValueError("the generation id key must be at least 16 bytes")
        self._key = key
        self.max_age_seconds = max_age_seconds

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, PREFIX.encode() + b"." + payload, hashlib.sha256).digest()

    def issue(self, policy_version: int, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        payload = f"{uuid.uuid4().hex}:{policy_version}:{issued}".encode()
        return f"{PREFIX}.{_b64(payload)}.{_b64(self._sign(payload))}"

    def verify(self, token: str, now: float | None = None) -> GenerationClaims:
        """Return the claims of a genuine, unexpired id; raise otherwise."""
        if not token or len(token) > MAX_ID_LENGTH:
            raise InvalidGenerationId("generation id is empty or too long")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise InvalidGenerationId("generation id is malformed")
        try:
            payload, signature = _unb64(parts[1]), _unb64(parts[2])
        except ValueError as exc:
            raise InvalidGenerationId("generation id is malformed") from exc
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise ForgedGenerationId("generation id signature is invalid")
        try:
            nonce, version, issued = payload.decode().split(":")
            claims = GenerationClaims(nonce, int(version), int(issued))
        except ValueError as exc:
            raise InvalidGenerationId("generation id payload is malformed") from exc
        age = (time.time() if now is None else now) - claims.issued_at
        if age > self.max_age_seconds:
            raise ExpiredGenerationId(f"generation id expired {int(age)} s after issue")
        return claims
