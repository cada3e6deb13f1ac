"""Envelope encryption, KEK rotation, fingerprints and HPKE sealing (pure, no servers)."""

from __future__ import annotations

import hashlib

import pytest

from shared.crypto import (
    IntegrityError,
    Kek,
    KekRing,
    Kem,
    RequesterKeyPair,
    SealError,
    UnknownKekError,
    open_envelope,
    rewrap_envelope,
    seal_envelope,
    seal_for_requester,
)

SECRET_A = "kek-a-Zr4Tq8Wm2Xn6Yp0Lk3Jh7Gf1Ds5Ab9Cv"
SECRET_B = "kek-b-Pq1Rs5Tu9Vw3Xy7Za2Bc6De0Fg4Hi8Jk"
AD = b"keyveil-key-v1|key_0123456789abcdef|1|openai|development"
KEY = b"sk-test-crypto-0123456789abcdef"


def test_envelope_round_trip_uses_fresh_data_key_and_nonce() -> None:
    kek = Kek(SECRET_A)
    one = seal_envelope(KEY, kek=kek, associated_data=AD)
    two = seal_envelope(KEY, kek=kek, associated_data=AD)
    assert one.ciphertext != two.ciphertext
    assert one.wrapped_key != two.wrapped_key
    assert KEY not in one.ciphertext
    assert len(one.ciphertext) == 12 + len(KEY) + 16
    assert open_envelope(one, keyring=KekRing(kek), associated_data=AD) == KEY


@pytest.mark.parametrize("part", ["ciphertext", "wrapped_key"])
def test_tampering_any_byte_fails(part: str) -> None:
    kek = Kek(SECRET_A)
    envelope = seal_envelope(KEY, kek=kek, associated_data=AD)
    blob = bytearray(getattr(envelope, part))
    for index in (0, 12, len(blob) - 1):
        changed = bytearray(blob)
        changed[index] ^= 0x80
        forged = type(envelope)(**{**envelope.__dict__, part: bytes(changed)})
        with pytest.raises(IntegrityError):
            open_envelope(forged, keyring=KekRing(kek), associated_data=AD)


def test_wrong_associated_data_fails() -> None:
    kek = Kek(SECRET_A)
    envelope = seal_envelope(KEY, kek=kek, associated_data=AD)
    with pytest.raises(IntegrityError):
        open_envelope(envelope, keyring=KekRing(kek), associated_data=AD.replace(b"|1|", b"|2|"))


def test_unknown_kek_is_named() -> None:
    envelope = seal_envelope(KEY, kek=Kek(SECRET_A), associated_data=AD)
    with pytest.raises(UnknownKekError) as caught:
        open_envelope(envelope, keyring=KekRing(Kek(SECRET_B)), associated_data=AD)
    assert caught.value.kek_id == Kek(SECRET_A).kek_id


def test_rewrap_moves_the_data_key_and_keeps_the_ciphertext() -> None:
    old, new = Kek(SECRET_A), Kek(SECRET_B)
    envelope = seal_envelope(KEY, kek=old, associated_data=AD)
    moved = rewrap_envelope(envelope, keyring=KekRing(new, [old]), associated_data=AD)
    assert moved.kek_id == new.kek_id != old.kek_id
    assert moved.ciphertext == envelope.ciphertext
    assert open_envelope(moved, keyring=KekRing(new), associated_data=AD) == KEY


def test_kek_ids_are_stable_distinct_and_do_not_leak() -> None:
    assert Kek(SECRET_A).kek_id == Kek(SECRET_A).kek_id != Kek(SECRET_B).kek_id
    assert SECRET_A not in repr(Kek(SECRET_A))
    assert SECRET_A not in Kek(SECRET_A).kek_id


def test_fingerprint_is_keyed_not_a_bare_hash() -> None:
    a, b = Kek(SECRET_A).fingerprint(KEY), Kek(SECRET_B).fingerprint(KEY)
    assert a != b
    assert a == Kek(SECRET_A).fingerprint(KEY)
    assert a.removeprefix("hs256:") not in hashlib.sha256(KEY).hexdigest()


@pytest.mark.parametrize("kem", list(Kem))
def test_hpke_seal_opens_only_with_the_right_key_and_info(kem: Kem) -> None:
    pair, other = RequesterKeyPair(kem), RequesterKeyPair(kem)
    sealed = seal_for_requester(KEY, pair.public_bytes, info=b"lease-1", kem=kem)
    assert pair.open(sealed, info=b"lease-1") == KEY
    with pytest.raises(SealError):
        pair.open(sealed, info=b"lease-2")
    with pytest.raises(SealError):
        other.open(sealed, info=b"lease-1")
    with pytest.raises(SealError):
        seal_for_requester(KEY, pair.public_bytes[:-1], info=b"x", kem=kem)


def test_hybrid_public_key_is_mlkem768_then_x25519() -> None:
    assert len(RequesterKeyPair(Kem.mlkem768_x25519).public_bytes) == 1184 + 32
    assert len(RequesterKeyPair(Kem.x25519).public_bytes) == 32
