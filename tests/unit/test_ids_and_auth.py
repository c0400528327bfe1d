import time
from collections import Counter

import pytest

from rlhf.auth import ApiKeys, Unauthenticated
from rlhf.bus import murmur2
from rlhf.ids import (
    ExpiredGenerationId,
    ForgedGenerationId,
    GenerationClaims,
    GenerationIdSigner,
    InvalidGenerationId,
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
    prefix, payload, signature = signer.issue(1).split(".")
    other_payload = signer.issue(99).split(".")[1]
    with pytest.raises(ForgedGenerationId):
        signer.verify(f"{prefix}.{other_payload}.{signature}")
    assert payload != other_payload


def test_old_id_is_expired():
    signer = GenerationIdSigner(KEY, max_age_seconds=60)
    token = signer.issue(1, now=1000)
    with pytest.raises(ExpiredGenerationId):
        signer.verify(token, now=1061)


@pytest.mark.parametrize("token", ["", "nope", "g1.a", "g1.@@@.###", "x" * 300, "g2.YQ.YQ"])
def test_malformed_ids(token):
    with pytest.raises(InvalidGenerationId):
        GenerationIdSigner(KEY).verify(token)


def test_short_key_refused():
    with pytest.raises(ValueError):
        GenerationIdSigner(b"short")


def test_api_keys_map_to_tenants():
    keys = ApiKeys.parse(["acme=" + "a" * 20, "globex=" + "b" * 20])
    assert keys.tenant_for([("authorization", "Bearer " + "b" * 20)]) == "globex"
    for metadata in ([], [("authorization", "a" * 20)], [("authorization", "Bearer wrong")]):
        with pytest.raises(Unauthenticated):
            keys.tenant_for(metadata)


@pytest.mark.parametrize("entry", ["nokey", "=abc", "tenant=short"])
def test_bad_api_key_config(entry):
    with pytest.raises(ValueError):
        ApiKeys.parse([entry])


def _signed(signer, payload: bytes) -> str:
    """A token with an arbitrary payload, correctly signed (as only the key holder could)."""
    from rlhf import ids

    return f"g1.{ids._b64(payload)}.{ids._b64(signer._sign(payload))}"


def test_prompt_digest_claim_is_optional_and_backwards_compatible():
    signer = GenerationIdSigner(KEY)
    digest = prompt_digest("What is RLHF?")
    bound = signer.verify(signer.issue(3, prompt_hash=digest))
    assert bound.prompt_hash == digest and bound.policy_version == 3
    assert signer.verify(signer.issue(3)).prompt_hash == ""
    # exactly what the generation service issues today: three fields
    legacy = _signed(signer, f"{'a' * 32}:5:{int(time.time())}".encode())
    assert signer.verify(legacy) == GenerationClaims("a" * 32, 5, signer.verify(legacy).issued_at)
    assert prompt_digest("What is RLHF?") == digest != prompt_digest("What is RLHF")


@pytest.mark.parametrize(
    "fields",
    [
        "n:1",
        "n:1:2:",
        "n:1:2:h:extra",
        "n:x:2",
        "n:1:2:h:",
        "n:-1:2",
        "n: 1:2",
        "n:١:2",
        "n:1:99999999999999999999",
    ],
)
def test_signed_but_malformed_payloads_are_invalid_not_forged(fields):
    signer = GenerationIdSigner(KEY)
    with pytest.raises(InvalidGenerationId) as caught:
        signer.verify(_signed(signer, fields.encode()))
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
    for odd in ["tenant:import:abc:prompt", "g1.%%%.x", "g1.bm90IGNsYWltcw.x", "", "g1." * 200]:
        assert partition_key(odd) == odd


def test_partition_key_does_not_verify():
    """Placement needs no key: a forged id with a digest is placed by it (and then refused by the
    feedback service, which verifies before publishing)."""
    digest = prompt_digest("p")
    forged = GenerationIdSigner(b"x" * 32).issue(1, prompt_hash=digest)
    assert partition_key(forged) == digest
