import pytest

from rlhf.auth import ApiKeys, Unauthenticated
from rlhf.ids import (
    ExpiredGenerationId,
    ForgedGenerationId,
    GenerationIdSigner,
    InvalidGenerationId,
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
