"""Hypothesis strategies, kept in one module and shared by the tests.

Requests as a well-behaved host sends them (`send_requests`) and as a
careless or hostile one might (`hostile_requests`), and the JSON-shaped
values both are made of. Strategies that fuzz one harness alone (the
WebSocket frames of test_conformance_wsproto, the wire and config junk of
test_bad_input) stay beside the tests they feed.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

from trio_drain import SendRequest


def json_like(
    scalars: st.SearchStrategy[Any], *, width: int = 3, key_size: int = 5, max_leaves: int = 8
) -> st.SearchStrategy[Any]:
    """`scalars`, and lists and string-keyed dicts of them nested up to
    `max_leaves` leaves, at most `width` items a level, keys at most
    `key_size` characters."""
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=width)
            | st.dictionaries(st.text(max_size=key_size), children, max_size=width)
        ),
        max_leaves=max_leaves,
    )


# -- requests a host may send -----------------------------------------------------------------

client_ids = st.sampled_from([f"m-{i}" for i in range(6)])
priorities = st.sampled_from(["now", "next", "low"])
meshes = st.sampled_from(["alpha", "beta"]) | st.none()
targets = st.sampled_from(["*", "#general", "@ops", "a" * 64]) | st.none()
payloads = st.binary(max_size=64)
#: Two ordering lanes, so lanes fill and hold often.
ordering_keys = st.none() | st.sampled_from(["lane-1", "lane-2"])
#: What a request's meta may hold: JSON with no floats and integers that
#: survive a round trip through a double.
json_values = json_like(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=10)
)
metas = st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@st.composite
def send_requests(draw: st.DrawFn, *, client_message_id: Any = client_ids) -> SendRequest:
    """Valid requests drawn from a small id pool, so ids collide often."""
    return SendRequest(
        payload=draw(payloads),
        mesh=draw(meshes),
        target_spec=draw(targets),
        priority=draw(priorities),
        meta=draw(metas),
        client_message_id=draw(client_message_id),
        ordering_key=draw(ordering_keys),
    )


# -- requests no host should send -------------------------------------------------------------

#: A value of the wrong type for any field.
anything = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
)
hostile_meta = st.one_of(
    st.none(),
    anything,
    json_like(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10), max_leaves=10),
    st.just({"deep": json.loads("[" * 900 + "]" * 900)}),
    st.just({1: "non-string key"}),
    st.just({"big": 2**80}),
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> SendRequest:
    """Requests whose every field may be missing, malformed or of the wrong type."""
    fields: dict[str, Any] = {
        "payload": draw(st.one_of(payloads, anything)),
        "mesh": draw(st.one_of(st.none(), st.text(max_size=20), anything)),
        "target_spec": draw(st.one_of(st.none(), st.sampled_from(["*", "#t", "@g", "ab" * 32]), anything)),
        "priority": draw(st.one_of(priorities, anything)),
        "destination_kind": draw(st.one_of(st.none(), st.sampled_from(["topic", "dm", "queue"]), anything)),
        "destination_ref": draw(st.one_of(st.none(), st.text(max_size=10), anything)),
        "reply_to_id": draw(st.one_of(st.none(), st.text(max_size=10), anything)),
        "meta": draw(hostile_meta),
        "client_message_id": draw(st.one_of(st.none(), st.text(string.printable, max_size=20), anything)),
        "nonce": draw(st.one_of(st.none(), st.sampled_from(["AAAA", "bm9uY2U="]), anything)),
        "ciphertext": draw(st.one_of(st.none(), st.sampled_from(["Y3Q=", "!!"]), anything)),
        "sender_session_pubkey": draw(st.one_of(st.none(), st.just("cd" * 32), anything)),
    }
    return SendRequest(**fields)
