"""The request fingerprint must be byte-compatible with the seed's daemon."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

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
        destination_kind="dm",
        destination_ref="ab" * 32,
        payload=b"\x00\xff",
        priority="now",
        reply_to_id="r-1",
        meta={"z": 1, "a": [True, None, "é"]},
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
    [
        ("#general", ("topic", "general")),
        ("ab" * 32, ("dm", "ab" * 32)),
        ("*", ("topic", "*")),
        ("@ops", ("topic", "@ops")),
        ("bob", ("topic", "bob")),
        ("#", ("topic", "#")),
    ],
)
def test_destination_is_derived_from_the_target_spec(target: str, expected: tuple[str, str]) -> None:
    assert derive_destination(target) == expected


# Known answers computed by an independent implementation of the algorithm
# (Node's crypto and JSON, RFC 8785 written from the RFC:
# tests/vectors/fingerprint.mjs), not by rebuilding the hash as the code does.
VECTORS: list[tuple[dict[str, object], str]] = [
    (
        {"destination_kind": "topic", "destination_ref": "general", "payload": b"hi"},
        "4f679314097bea79c2a84caa3a7277560e1971e3f2ed2864514ed50959ef90bd",
    ),
    (
        {
            "destination_kind": "dm",
            "destination_ref": "ab" * 32,
            "reply_to_id": "r-1",
            "priority": "now",
            "meta": {"z": 1, "a": [True, None, "é"]},
            "payload": b"\x00\xff",
        },
        "96bff541a5f4ab5ee1be808f045f54804a3d6abb96b80326f3e9798426da80b7",
    ),
    (
        {
            "destination_kind": "queue",
            "destination_ref": "jobs",
            "priority": "low",
            "meta": {"€": 1, "\x80": 2, "a": {"y": 1.5, "b": 1e21}},
            "payload": b"",
        },
        "1c3759fc434f5d812de9a8a4d9e3194f1d9674bde161af1aeca44cad094ee0e8",
    ),
    (
        {"destination_kind": "topic", "destination_ref": "*", "meta": {}, "payload": b"x" * 1000},
        "32a99824dec69b85d91103b4498c880664c69fbe532889825a7dd135d7b3659c",
    ),
    (
        {
            "destination_kind": "topic",
            "destination_ref": "ünïcode",
            "reply_to_id": "",
            "meta": {"n": -1e-7, "big": 1.2345678901234567e300, "s": '\u2028\n"'},
            "payload": bytes.fromhex("deadbeef"),
        },
        "dcf00ccece2752e62cd1efe940fc778d6f923d78ce84c64ba3c5d2f855ca8b40",
    ),
]


@pytest.mark.parametrize(("fields", "expected"), VECTORS)
def test_fingerprint_matches_an_independent_implementations_known_answers(
    fields: dict[str, Any],
    expected: str,
) -> None:
    assert request_fingerprint(**fields).hex() == expected


def test_the_known_answers_are_what_the_independent_implementation_prints() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the stored known answers are checked above without it")
    script = Path(__file__).parent / "vectors" / "fingerprint.mjs"
    printed = json.loads(
        subprocess.run([node, str(script)], capture_output=True, text=True, check=True, timeout=60).stdout
    )
    assert [case["fingerprint"] for case in printed] == [expected for _, expected in VECTORS]
