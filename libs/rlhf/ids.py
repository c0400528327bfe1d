"""Unforgeable generation ids: an HMAC-signed token carrying the policy version and issue time.

The feedback service verifies a token without a database lookup: a wrong signature is a forgery,
an old issue time is expired. Format: `g1.<base64url(payload)>.<base64url(hmac-sha256)>` with
payload `<uuid hex>:<policy version>:<unix seconds>[:<prompt digest>]`.

The prompt digest is optional so ids issued before it existed still verify: when a generation
service passes `prompt_hash=prompt_digest(prompt)`, the feedback service can prove that every id of
a ranking answers the same prompt; ids without it cannot be checked for that.

The same digest is the Kafka key of a generation's event and of every feedback event on it
(`partition_key`), so a generation, its feedback and any ranking over its prompt share a partition.
"""

from __future__ import annotations

import base64
import binascii
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
    prompt_hash: str = ""  # empty when the issuer did not bind the id to its prompt


def prompt_digest(prompt: str) -> str:
    """A short digest of the prompt text exactly as tokenised, to bind into a generation id."""
    return _b64(hashlib.sha256(prompt.encode("utf-8")).digest()[:16])


def partition_key(generation_id: str) -> str:
    """The Kafka key of the generation event of `generation_id` and of all feedback on it.

    The prompt digest bound into the id, when there is one: every answer to one prompt then shares
    a partition, so a ranking (which may only order answers to one prompt) lands with all the
    generations it orders, and a consumer that owns the partition can join it whole. Other ids
    (issued before the digest existed, or not ours at all, e.g. imported data) key by themselves,
    which still puts a generation and its feedback together.

    The id is parsed, not verified: producers key what they already trust (the generation service
    issued it; the feedback service verified it), and a key decides placement, never trust.
    """
    parts = generation_id.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or len(generation_id) > MAX_ID_LENGTH:
        return generation_id
    try:
        prompt_hash = _parse_claims(_unb64(parts[1]).decode()).prompt_hash
    except ValueError:  # also UnicodeDecodeError and binascii.Error, both ValueErrors
        return generation_id
    return prompt_hash or generation_id


_PREFIX_DOT = PREFIX.encode() + b"."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _unb64(text: str) -> bytes:
    """base64.urlsafe_b64decode with the padding restored, in two C calls instead of Python's
    several (a feedback id is decoded three times per submission). Non-ASCII text raises
    UnicodeEncodeError, a ValueError as urlsafe_b64decode's error is."""
    data = text.encode("ascii").translate(_FROM_URLSAFE)
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


class GenerationIdSigner:
    def __init__(self, key: bytes, max_age_seconds: float = 7 * 24 * 3600) -> None:
        if len(key) < 16:
            raise ValueError("the generation id key must be at least 16 bytes")
        # Keyed once; each signature copies it. (hmac.digest() and hmac.new() set the key up
        # on every call, and the one-shot form releases the GIL around even a 60-byte message:
        # in a service whose other threads hold it, each id then waits for the GIL to return.)
        self._mac = hmac.new(key, _PREFIX_DOT, hashlib.sha256)
        self.max_age_seconds = max_age_seconds

    def _sign(self, payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(payload)
        return mac.digest()

    def issue(self, policy_version: int, now: float | None = None, prompt_hash: str = "") -> str:
        """A fresh signed id; pass `prompt_hash=prompt_digest(prompt)` to bind it to its prompt."""
        if ":" in prompt_hash:
            raise ValueError("prompt_hash must not contain ':'")
        issued = int(time.time() if now is None else now)
        fields = [uuid.uuid4().hex, str(policy_version), str(issued)]
        payload = ":".join([*fields, prompt_hash] if prompt_hash else fields).encode()
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
            claims = _parse_claims(payload.decode())
        except ValueError as exc:
            raise InvalidGenerationId("generation id payload is malformed") from exc
        age = (time.time() if now is None else now) - claims.issued_at
        if age > self.max_age_seconds:
            raise ExpiredGenerationId(f"generation id expired {int(age)} s after issue")
        return claims


def _parse_claims(payload: str) -> GenerationClaims:
    """Three fields (ids issued without a prompt digest) or four; anything else is malformed.

    Version and time must be plain ASCII digits: `int()` alone would also take " 5", "-5" or
    non-ASCII digits, and at most 19 of them (below 2**63: fits every integer field it lands
    in, the uint64 of events included).
    """
    fields = payload.split(":")
    if len(fields) not in (3, 4) or (len(fields) == 4 and not fields[3]):
        raise ValueError(f"expected 3 or 4 non-empty fields, got {len(fields)}")
    if not all(n.isascii() and n.isdigit() and len(n) <= 19 for n in fields[1:3]):
        raise ValueError("policy version and issue time must be unsigned integers")
    prompt_hash = fields[3] if len(fields) == 4 else ""
    return GenerationClaims(fields[0], int(fields[1]), int(fields[2]), prompt_hash)


def feedback_event_id(tenant: str, idempotency_key: str) -> str:
    """The id of a feedback event: the same (tenant, idempotency key) gives the same id in every
    process, before and after restarts, so a resent submission is one event downstream. The
    feedback service and the offline importer both name their events with it."""
    material = f"{len(tenant)}:{tenant}:{idempotency_key}".encode()
    return hashlib.sha256(material).hexdigest()[:32]
