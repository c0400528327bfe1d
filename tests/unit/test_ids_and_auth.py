import base64
import time
from collections import Counter

import pytest

from rlhf import ids
from rlhf.auth import (
    APP,
    OPERATOR,
    READER,
    Credentials,
    PermissionDenied,
    Principal,
    Unauthenticated,
    allow,
)
from rlhf.bus import murmur2
from rlhf.ids import (
    ExpiredGenerationId,
    ForgedGenerationId,
    GenerationIdSigner,
    InvalidGenerationId,
    key_id,
    partition_key,
    prompt_digest,
)

KEY = b"k" * 32


def test_issued_id_verifies_with_its_claims():
    signer = GenerationIdSigner(KEY)
    token = signer.issue(policy_version=7, now=1_000_000)
    claims = signer.verify(token, now=1_000_010)
    assert claims.policy_version == 7 and claims.issued_at == 1_000_000
    assert signer.issue(7) != signer.issue(7)  # a fresh nonce every time


def test_id_signed_with_another_key_is_forged():
    token = GenerationIdSigner(b"x" * 32).issue(1)
    with pytest.raises(ForgedGenerationId):
        GenerationIdSigner(KEY).verify(token)


def test_tampered_payload_is_forged():
    signer = GenerationIdSigner(KEY)
    prefix, kid, payload, signature = signer.issue(1, tenant="acme").split(".")
    other_payload = signer.issue(99, tenant="other").split(".")[2]
    with pytest.raises(ForgedGenerationId):
        signer.verify(f"{prefix}.{kid}.{other_payload}.{signature}")
    assert payload != other_payload


def test_old_id_is_expired():
    signer = GenerationIdSigner(KEY, max_age_seconds=60)
    token = signer.issue(1, now=1000)
    with pytest.raises(ExpiredGenerationId):
        signer.verify(token, now=1061)


@pytest.mark.parametrize(
    "token", ["", "nope", "g1.a", "g1.@@@.###", "x" * 400, "g2.YQ.YQ", "g2.k.YQ.YQ.YQ", "g2..YQ.YQ"]
)
def test_malformed_ids(token):
    with pytest.raises(InvalidGenerationId):
        GenerationIdSigner(KEY).verify(token)


def test_short_key_refused():
    with pytest.raises(ValueError):
        GenerationIdSigner(b"short")


def test_api_keys_map_to_tenants():
    keys = Credentials.parse(APP, ["acme=" + "a" * 20, "globex=" + "b" * 20])
    assert keys.tenant_for([("authorization", "Bearer " + "b" * 20)]) == "globex"
    for metadata in ([], [("authorization", "a" * 20)], [("authorization", "Bearer wrong")]):
        with pytest.raises(Unauthenticated):
            keys.tenant_for(metadata)


def test_a_tenant_may_hold_several_keys_but_a_key_names_one_principal():
    """A second key for a tenant adds to the first (rotation), it does not replace it."""
    keys = Credentials.parse(APP, ["acme=" + "a" * 20, "acme=" + "c" * 20])
    for key in ("a" * 20, "c" * 20):
        assert keys.tenant_for([("authorization", f"Bearer {key}")]) == "acme"
    with pytest.raises(ValueError, match="twice"):
        Credentials.parse(APP, ["acme=" + "a" * 20, "globex=" + "a" * 20])
    with pytest.raises(ValueError, match="both"):
        _ = Credentials.parse(APP, ["acme=" + "a" * 20]) | Credentials.parse(
            OPERATOR, ["ops=" + "a" * 20]
        )


def test_roles_decide_what_a_key_may_call():
    keys = Credentials.parse(READER, ["dash=" + "r" * 20]) | Credentials.parse(
        OPERATOR, ["ops=" + "o" * 20]
    )
    reader = keys.identify([("authorization", "Bearer " + "r" * 20)])
    operator = keys.identify([("authorization", "Bearer " + "o" * 20)])
    assert reader == Principal(READER, "dash")
    allow(READER).check(reader)
    allow(READER).check(operator)  # an operator may do what a reader may
    with pytest.raises(PermissionDenied):
        allow(OPERATOR).check(reader)
    with pytest.raises(Unauthenticated):  # an operator's key is no app key
        keys.tenant_for([("authorization", "Bearer " + "o" * 20)])


@pytest.mark.parametrize("entry", ["nokey", "=abc", "tenant=short", "bad name=" + "k" * 20])
def test_bad_api_key_config(entry):
    with pytest.raises(ValueError):
        Credentials.parse(APP, [entry])


def _signed(signer, payload: str, kid: str | None = None) -> str:
    """A token with an arbitrary payload, correctly signed (as only the key holder could)."""
    kid = signer.key_id if kid is None else kid
    return f"g2.{kid}.{ids._b64(payload.encode())}.{ids._b64(signer._sign(kid, payload))}"


def test_claims_carry_the_tenant_prompt_and_key_id():
    signer = GenerationIdSigner(KEY)
    digest = prompt_digest("What is RLHF?")
    claims = signer.verify(signer.issue(3, prompt_hash=digest, tenant="acme"))
    assert (claims.prompt_hash, claims.policy_version, claims.tenant) == (digest, 3, "acme")
    assert claims.key_id == signer.key_id == key_id(KEY)
    assert signer.verify(signer.issue(3)).prompt_hash == ""
    assert prompt_digest("What is RLHF?") == digest != prompt_digest("What is RLHF")
    with pytest.raises(ValueError):
        signer.issue(1, tenant="not a tenant")


def _lenient(text: str) -> bytes:
    """How a permissive decoder reads base64url: pad, decode, ignore the unused low bits."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_one_generation_has_exactly_one_accepted_id():
    """Padding, junk characters, other spellings of the same bytes: all refused, so duplicate
    checks and joins that compare ids as strings cannot be fooled."""
    signer = GenerationIdSigner(KEY)
    token = signer.issue(2, prompt_hash=prompt_digest("p"), tenant="acme")
    prefix, kid, payload, signature = token.split(".")
    last = payload[-1]
    flipped = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The same bytes with nonzero unused low bits in the last character (when there are any).
    twins = [c for c in flipped if c != last and _lenient(payload[:-1] + c) == _lenient(payload)]
    assert twins or len(payload) % 4 == 0  # some spelling of the same bytes exists
    variants = [
        token + "=",
        f"{prefix}.{kid}.{payload}=.{signature}",
        f"{prefix}.{kid}.{payload}==.{signature}",
        f"{prefix}.{kid}.{payload[:5]}!{payload[5:]}.{signature}",
        f"{prefix}.{kid}.{payload}.{signature}\n",
        f"{prefix}.{kid}.{payload[:4]} {payload[4:]}.{signature}",
        f"{prefix}.{kid}.{payload.replace('-', '+').replace('_', '/')}.{signature}",
        *(f"{prefix}.{kid}.{payload[:-1]}{c}.{signature}" for c in twins),
        token.upper(),
    ]
    for variant in variants:
        if variant == token:
            continue
        with pytest.raises(InvalidGenerationId):
            signer.verify(variant)
    assert signer.verify(token).tenant == "acme"


def test_future_dated_ids_are_refused():
    signer = GenerationIdSigner(KEY)
    now = 1_000_000
    signer.verify(signer.issue(1, now=now + 30), now=now)  # clock skew between pods
    with pytest.raises(InvalidGenerationId, match="future"):
        signer.verify(signer.issue(1, now=now + 3600), now=now)


def test_ids_stay_verifiable_across_a_key_rotation():
    """The new key signs, the old one still verifies what it signed; an id naming a key the
    verifier does not hold is forged."""
    old, new = b"o" * 32, b"n" * 32
    before = GenerationIdSigner(old).issue(1, prompt_hash=prompt_digest("p"))
    rotated = GenerationIdSigner(new, verify_keys=[old])
    after = rotated.issue(2, prompt_hash=prompt_digest("p"))
    assert rotated.verify(before).key_id == key_id(old)
    assert rotated.verify(after).key_id == key_id(new) != key_id(old)
    # Before the rotation, verifiers learn the next key first: it verifies before it signs.
    assert GenerationIdSigner(old, verify_keys=[new]).verify(after).policy_version == 2
    with pytest.raises(ForgedGenerationId):
        GenerationIdSigner(new).verify(before)  # the old key was dropped
    with pytest.raises(ValueError):
        GenerationIdSigner(new, verify_keys=[new])


@pytest.mark.parametrize(
    "fields",
    [
        "n:1",
        "{n}:1:2:h",
        "{n}:1:2:h:t:extra",
        "{n}:x:2:h:t",
        "{n}:-1:2:h:t",
        "{n}: 1:2:h:t",
        "{n}:١:2:h:t",
        "{n}:01:2:h:t",
        "{n}:1:99999999999999999999:h:t",
        "{n}:1:2:h=:t",
        "{n}:1:2:h:bad tenant",
        "xyz:1:2:h:t",
    ],
)
def test_signed_but_malformed_payloads_are_invalid_not_forged(fields):
    signer = GenerationIdSigner(KEY)
    payload = fields.format(n="a" * 32).replace(":2:", f":{int(time.time())}:")
    with pytest.raises(InvalidGenerationId) as caught:
        signer.verify(_signed(signer, payload))
    assert not isinstance(caught.value, ForgedGenerationId)


def test_prompt_hash_cannot_smuggle_fields():
    with pytest.raises(ValueError):
        GenerationIdSigner(KEY).issue(1, prompt_hash="h:999")


def test_partition_key_is_the_prompt_digest():
    signer = GenerationIdSigner(KEY)
    digest = prompt_digest("Name three rivers.")
    answers = [signer.issue(v, prompt_hash=digest) for v in (1, 1, 2)]
    # Every answer to one prompt (whatever policy version) has one key, so a ranking over them
    # and the generations it orders share a partition; the key is not the id itself.
    assert {partition_key(gid) for gid in answers} == {digest}
    other = signer.issue(1, prompt_hash=prompt_digest("Name three lakes."))
    assert partition_key(other) != digest


def test_partition_key_spreads_prompts_over_partitions():
    signer = GenerationIdSigner(KEY)
    keys = {partition_key(signer.issue(1, prompt_hash=prompt_digest(f"q{n}"))) for n in range(200)}
    assert len(keys) == 200
    partitions = Counter((murmur2(key.encode()) & 0x7FFFFFFF) % 6 for key in keys)
    assert len(partitions) == 6 and min(partitions.values()) >= 15  # about 33 each


def test_partition_key_of_ids_without_digest_is_the_id():
    signer = GenerationIdSigner(KEY)
    unbound = signer.issue(1)
    assert partition_key(unbound) == unbound
    # Not ours, or not ids at all (imported data): keyed by themselves, never an error.
    for odd in ["tenant:import:abc:prompt", "g2.k.%%%.x", "g2.k.bm90IGNsYWltcw.x", "", "g2." * 200]:
        assert partition_key(odd) == odd


def test_partition_key_does_not_verify():
    """Placement needs no key: a forged id with a digest is placed by it (and then refused by the
    feedback service, which verifies before publishing)."""
    digest = prompt_digest("p")
    forged = GenerationIdSigner(b"x" * 32).issue(1, prompt_hash=digest)
    assert partition_key(forged) == digest


def test_every_other_spelling_of_an_id_is_refused():
    """One character changed anywhere (fast or careful parsing alike): never accepted."""
    signer = GenerationIdSigner(b"k" * 32)
    token = signer.issue(3, prompt_hash=prompt_digest("hi"), tenant="acme")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=:"
    refused = 0
    for position in range(len(token)):
        for character in alphabet:
            changed = token[:position] + character + token[position + 1 :]
            if changed == token:
                continue
            with pytest.raises(InvalidGenerationId):
                signer.verify(changed)
            refused += 1
    assert refused == len(token) * (len(alphabet) - 1)
    assert signer.verify(token).tenant == "acme"
