"""Hypothesis strategies, kept in one module and shared by the tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from trio_drain import SendRequest

client_ids = st.sampled_from([f"m-{i}" for i in range(6)])
priorities = st.sampled_from(["now", "next", "low"])
meshes = st.sampled_from(["alpha", "beta"]) | st.none()
targets = st.sampled_from(["*", "#general", "@ops", "a" * 64]) | st.none()
payloads = st.binary(max_size=64)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
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
    )
