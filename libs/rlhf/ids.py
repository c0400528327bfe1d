"""Unforgeable generation ids: HMAC-signed tokens naming their key, tenant, policy version and time.

The feedback service verifies a token without a database lookup: a wrong signature is a forgery,
an old issue time is expired, a time in the future is refused. Format:

    g2.<key id>.<base64url(payload)>.<base64url(hmac-sha256)>

with payload `<uuid hex>:<policy version>:<unix seconds>:<prompt digest>:<tenant>` and the HMAC
over `g2.<key id>.<payload>`. Everything is canonical: unpadded base64url with no other
characters, plain decimal numbers, one spelling per id. Verification re-encodes what it decoded
and compares, so one generation has exactly one accepted id (no extra padding, junk characters
or leading zeros), and ranking duplicates and joins compare ids as strings safely.

The key id is derived from the key (`key_id`), so ids stay verifiable across a rotation: the
verifier holds the current key and the previous ones (`verify_keys`) and picks the key an id
names; the signer signs with the current key only.

The tenant is the app that asked for the generation (empty when generation is open to callers
without a key): the feedback service takes feedback on it from that tenant only.

The prompt digest lets the feedback service prove that every id of a ranking answers the same
prompt; it is also the Kafka key of a generation's event and of every feedback event on it
(`partition_key`), so a generation, its feedback and any ranking over its prompt share a partition.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "g2"
MAX_ID_LENGTH = 320  # the longest canonical id (19-digit version, 64-char tenant) is 258
# Ids issued this far in the future (clock skew between pods) still verify; later ones do not.
MAX_CLOCK_SKEW_SECONDS = 60
_B64 = re.compile(r"[A-Za-z0-9_-]+")
_UNSIGNED = re.compile(r"0|[1-9][0-9]{0,18}")  # canonical, and below 2**63
_NONCE = re.compile(r"[0-9a-f]{32}")
_TENANT = re.compile(r"|[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # rlhf.auth.NAME, or empty
_DIGEST = re.compile(r"[A-Za-z0-9_-]*")
_B64_VALUE = {
    c: v for v, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
_UNUSED_BITS = {2: 0x0F, 3: 0x03}  # by length modulo 4: bits of the last character past the data
_URLSAFE = bytes.maketrans(b"-_", b"+/")
# A canonical id in one match: the fast path of verification (anything else takes the careful
# path, which says what is wrong). ":" is in none of the payload's fields, so the fields split
# one way only.
_TOKEN = re.compile(rf"{PREFIX}\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_CLAIMS = re.compile(
    rf"({_NONCE.pattern}):({_UNSIGNED.pattern}):({_UNSIGNED.pattern}):"
    rf"({_DIGEST.pattern}):({_TENANT.pattern})"
)


class InvalidGenerationId(ValueError):
    """Not a generation id at all (malformed, not canonical, or from the future)."""


class ForgedGenerationId(InvalidGenerationId):
    """Well formed but not signed with any of our keys."""


class ExpiredGenerationId(InvalidGenerationId):
    """Signed by us but older than the accepted age."""


@dataclass(frozen=True)
class GenerationClaims:
    nonce: str
    policy_version: int
    issued_at: int
    prompt_hash: str = ""  # empty when the issuer did not bind the id to its prompt
    tenant: str = ""  # the app the generation answered; "" when generation is open
    key_id: str = ""


def prompt_digest(prompt: str) -> str:
    """A short digest of the prompt text exactly as tokenised, to bind into a generation id."""
    return _b64(hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()[:16])


def key_id(key: bytes) -> str:
    """The id of an HMAC key: derived from the key (so it cannot name the wrong one) without
    revealing anything about it."""
    return _b64(hmac.new(key, b"rlhf generation id key id", hashlib.sha256).digest()[:6])


def partition_key(generation_id: str) -> str:
    """The Kafka key of the generation event of `generation_id` and of all feedback on it.

    The prompt digest bound into the id: every answer to one prompt then shares a partition, so
    a ranking (which may only order answers to one prompt) lands with all the generations it
    orders, and a consumer that owns the partition can join it whole. Other ids (not ours, e.g.
    imported data) key by themselves, which still puts a generation and its feedback together.

    The id is parsed, not verified: producers key what they already trust (the generation service
    issued it; the feedback service verified it), and a key decides placement, never trust.
    """
    try:
        _kid, payload, _signature = _split(generation_id)
        return _parse_claims(payload).prompt_hash or generation_id
    except InvalidGenerationId:
        return generation_id


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Strict base64url: the alphabet only, no padding, and exactly what `_b64` would write
    (the unused low bits of the last character must be zero)."""
    if not _B64.fullmatch(text):
        raise InvalidGenerationId("generation id is not canonical base64url")
    return _unb64_alphabet_checked(text)


def _unb64_alphabet_checked(text: str) -> bytes:
    """`_unb64` of text already known to hold only base64url characters: canonical when its
    length is not 1 modulo 4 and the bits its last character carries beyond the data are zero
    (so re-encoding would give `text` back)."""
    tail = len(text) % 4
    if tail == 1 or (tail and _B64_VALUE[text[-1]] & _UNUSED_BITS[tail]):
        raise InvalidGenerationId("generation id is not canonical base64url")
    return binascii.a2b_base64(text.encode("ascii").translate(_URLSAFE) + b"=" * (-tail % 4))


def _split(token: str) -> tuple[str, str, bytes]:
    """(key id, payload text, signature) of a well-formed id; InvalidGenerationId otherwise."""
    if not isinstance(token, str) or not token or len(token) > MAX_ID_LENGTH:
        raise InvalidGenerationId("generation id is empty or too long")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise InvalidGenerationId("generation id is malformed")
    kid = parts[1]
    if not _B64.fullmatch(kid):
        raise InvalidGenerationId("generation id is malformed")
    try:
        payload = _unb64(parts[2]).decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidGenerationId("generation id payload is malformed") from exc
    return kid, payload, _unb64(parts[3])


def _parse_canonical(token: str) -> tuple[str, str, bytes, GenerationClaims] | None:
    """(key id, payload, signature, claims) of a well-formed id with well-formed claims, in
    two regular expression matches; None for anything else (`_split` and `_parse_claims` then
    say what is wrong). Accepts exactly what they accept."""
    if not isinstance(token, str) or len(token) > MAX_ID_LENGTH:
        return None
    parts = _TOKEN.fullmatch(token)
    if parts is None:
        return None
    kid, encoded_payload, encoded_signature = parts.groups()
    try:
        payload = _unb64_alphabet_checked(encoded_payload).decode("ascii")
        signature = _unb64_alphabet_checked(encoded_signature)
    except (InvalidGenerationId, UnicodeDecodeError):
        return None
    fields = _CLAIMS.fullmatch(payload)
    if fields is None:
        return None
    nonce, version, issued, prompt_hash, tenant = fields.groups()
    claims = GenerationClaims(nonce, int(version), int(issued), prompt_hash, tenant, kid)
    return kid, payload, signature, claims


def _parse_claims(payload: str, kid: str = "") -> GenerationClaims:
    """Five canonical fields; anything else is malformed."""
    fields = payload.split(":")
    if len(fields) != 5:
        raise InvalidGenerationId(f"generation id payload has {len(fields)} fields, not 5")
    nonce, version, issued, prompt_hash, tenant = fields
    if not _NONCE.fullmatch(nonce):
        raise InvalidGenerationId("generation id nonce is malformed")
    if not (_UNSIGNED.fullmatch(version) and _UNSIGNED.fullmatch(issued)):
        raise InvalidGenerationId("policy version and issue time must be canonical integers")
    if not _DIGEST.fullmatch(prompt_hash) or not _TENANT.fullmatch(tenant):
        raise InvalidGenerationId("generation id prompt digest or tenant is malformed")
    return GenerationClaims(nonce, int(version), int(issued), prompt_hash, tenant, kid)


class GenerationIdSigner:
    """Issues ids with `key` and verifies ids signed with it or any of `verify_keys`."""

    def __init__(
        self,
        key: bytes,
        max_age_seconds: float = 7 * 24 * 3600,
        verify_keys: Iterable[bytes] = (),
    ) -> None:
        keys = [key, *verify_keys]
        if any(len(k) < 16 for k in keys):
            raise ValueError("every generation id key must be at least 16 bytes")
        # Keyed once per key; each signature copies its MAC. (hmac.new() sets the key up on
        # every call, and the one-shot form releases the GIL around even a short message: in a
        # service whose other threads hold it, each id then waits for the GIL to return.)
        self._keys = {key_id(k): hmac.new(k, digestmod=hashlib.sha256) for k in keys}
        if len(self._keys) != len(keys):
            raise ValueError("a generation id key is listed twice")
        self.key_id = key_id(key)
        self.max_age_seconds = max_age_seconds

    def _sign(self, kid: str, payload: str) -> bytes:
        message = f"{PREFIX}.{kid}.{payload}".encode()
        mac = self._keys[kid].copy()
        mac.update(message)
        return mac.digest()

    def issue(
        self,
        policy_version: int,
        now: float | None = None,
        prompt_hash: str = "",
        tenant: str = "",
    ) -> str:
        """A fresh signed id for an answer to the prompt whose `prompt_digest` is `prompt_hash`
        (the generation service always binds it; "" leaves the id unbound), asked for by
        `tenant` ("" when the caller presented no app key)."""
        if not _DIGEST.fullmatch(prompt_hash) or not _TENANT.fullmatch(tenant):
            raise ValueError("prompt_hash must be a prompt_digest and tenant a tenant name")
        if policy_version < 0:
            raise ValueError("policy_version must be >= 0")
        issued = int(time.time() if now is None else now)
        payload = f"{uuid.uuid4().hex}:{policy_version}:{issued}:{prompt_hash}:{tenant}"
        signature = self._sign(self.key_id, payload)
        return f"{PREFIX}.{self.key_id}.{_b64(payload.encode())}.{_b64(signature)}"

    def verify(self, token: str, now: float | None = None) -> GenerationClaims:
        """Return the claims of a genuine, unexpired id; raise otherwise."""
        canonical = _parse_canonical(token)
        if canonical is None:
            kid, payload, signature = _split(token)
            claims = None
        else:
            kid, payload, signature, claims = canonical
        if kid not in self._keys:
            raise ForgedGenerationId("generation id names a key this service does not hold")
        if not hmac.compare_digest(signature, self._sign(kid, payload)):
            raise ForgedGenerationId("generation id signature is invalid")
        if claims is None:  # signed, so malformed claims are invalid, not forged
            claims = _parse_claims(payload, kid)
        age = (time.time() if now is None else now) - claims.issued_at
        if age < -MAX_CLOCK_SKEW_SECONDS:
            raise InvalidGenerationId("generation id is issued in the future")
        if age > self.max_age_seconds:
            raise ExpiredGenerationId(f"generation id expired {int(age)} s after issue")
        return claims


def feedback_event_id(tenant: str, idempotency_key: str) -> str:
    """The id of a feedback event: the same (tenant, idempotency key) gives the same id in every
    process, before and after restarts, so a resent submission is one event downstream. The
    feedback service and the offline importer both name their events with it."""
    material = f"{len(tenant)}:{tenant}:{idempotency_key}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:32]


def user_signal_event_id(tenant: str, generation_id: str, user_key: str, signal: str) -> str:
    """The id of a feedback event from an app that names its user: one per (generation, tenant,
    user, kind of signal), whatever the idempotency key, so a user's second thumb on the same
    answer is the same event downstream and counted once."""
    parts = (tenant, generation_id, user_key, signal)
    material = ":".join(f"{len(p)}:{p}" for p in parts).encode("utf-8", "surrogatepass")
    return "u" + hashlib.sha256(material).hexdigest()[:31]
