"""The request fingerprint must be byte-compatible with the seed's daemon."""

from __future__ import annotations

import hashlib

import pytest

from trio_drain import InvalidRequest, canonical_json, request_fingerprint
from trio_drain._fingerprint import derive_destination


def by_hand(*parts: bytes, body: bytes) -> bytes:
    return hashlib.sha256(b"".join(p + b"\x00" for p in parts) + hashlib.sha256(body).digest()).digest()


def test_fingerprint_layout_without_meta_or_reply() -> None:
    got = request_fingerprint(destination_kind="topic", destination_ref="general", payload=b"hi")
    assert got == by_hand(b"1", b"topic", b"general", b"", b"next", b"", body=b"hi")


def test_fingerprint_with_meta_uses_canonical_json_and_reply_to() -> None:
    got = request_fingerprint(
        destination_kind="dm", destination_ref="ab" * 32, payload=b"\x00\xff", priority="now",
        reply_to_id="r-1", meta={"z": 1, "a": [True, None, "é"]},
    )
    meta = '{"a":[true,null,"é"],"z":1}'.encode()
    assert got == by_hand(b"1", b"dm", b"ab" * 32, b"r-1", b"now", meta, body=b"\x00\xff")


def test_canonical_json_follows_rfc8785_for_numbers_and_key_order() -> None:
    assert canonical_json({"b": 1.0, "a": 1e21, "c": 0.1}) == b'{"a":1e+21,"b":1,"c":0.1}'


def test_non_json_meta_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="meta"):
        canonical_json({"a": {1, 2}})


@pytest.mark.parametrize(
    ("target", "expected"),
    [("#general", ("topic", "general")), ("ab" * 32, ("dm", "ab" * 32)), ("*", ("topic", "*")),
     ("@ops", ("topic", "@ops")), ("bob", ("topic", "bob")), ("#", ("topic", "#"))],
)
def test_destination_is_derived_from_the_target_spec(target: str, expected: tuple[str, str]) -> None:
    assert derive_destination(target) == expected
