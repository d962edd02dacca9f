"""Routing rules (section 4) and the frames rows go out as."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_drain import BrokerRegistry
from trio_drain._brokers._registry import NoBroker, Ready, Unavailable
from trio_drain._brokers._wire import OutgoingMessage, encode_json, outgoing_message

from .builders import claimed_row
from .helpers import FakeBroker

SESSION = "ab" * 32


def test_a_session_row_goes_only_through_its_session_broker() -> None:
    reg, mesh, session = BrokerRegistry(), FakeBroker(), FakeBroker()
    reg.set_mesh("alpha", mesh)
    reg.set_session(SESSION, session)
    route = reg.resolve(claimed_row(sender_session_pubkey=SESSION))
    assert isinstance(route, Ready) and route.broker is session


@pytest.mark.parametrize("registered", [True, False])
def test_a_session_row_never_falls_back_to_the_mesh_socket(registered: bool) -> None:
    reg = BrokerRegistry()
    reg.set_mesh("alpha", FakeBroker())
    if registered:
        reg.set_session(SESSION, FakeBroker(is_open=False))
    route = reg.resolve(claimed_row(sender_session_pubkey=SESSION))
    assert route == Unavailable(f"session:{SESSION[:12]}", "session", SESSION)


def test_a_mesh_row_uses_its_mesh_broker_and_waits_while_it_is_closed() -> None:
    reg, alpha, beta = BrokerRegistry(), FakeBroker(), FakeBroker()
    reg.set_mesh("alpha", alpha)
    reg.set_mesh("beta", beta)
    route = reg.resolve(claimed_row(mesh="beta"))
    assert isinstance(route, Ready) and route.broker is beta
    beta.set_open(False)
    assert isinstance(reg.resolve(claimed_row(mesh="beta")), Unavailable)
    assert reg.route_unavailable("mesh", "beta")
    assert not reg.route_unavailable("mesh", "alpha")


def test_an_unregistered_mesh_is_no_broker() -> None:
    reg = BrokerRegistry()
    reg.set_mesh("alpha", FakeBroker())
    assert reg.resolve(claimed_row(mesh="gamma")) == NoBroker("gamma")


def test_a_row_without_mesh_uses_the_only_mesh_broker_or_none() -> None:
    reg, alpha = BrokerRegistry(), FakeBroker()
    assert reg.resolve(claimed_row(mesh=None)) == NoBroker(None)
    reg.set_mesh("alpha", alpha)
    route = reg.resolve(claimed_row(mesh=None))
    assert isinstance(route, Ready) and route.broker is alpha
    reg.set_mesh("beta", FakeBroker())
    assert reg.resolve(claimed_row(mesh=None)) == NoBroker(None)


def test_registry_changes_and_broker_openings_call_listeners() -> None:
    reg, broker, calls = BrokerRegistry(), FakeBroker(is_open=False), []
    reg.add_listener(lambda: calls.append(1))
    reg.set_mesh("alpha", broker)
    reg.set_mesh("alpha", broker)  # subscribing twice must not double-notify
    calls.clear()
    broker.set_open(True)
    assert calls == [1]


def test_registry_refuses_bad_keys() -> None:
    with pytest.raises(ValueError):
        BrokerRegistry().set_session("not-hex", FakeBroker())
    with pytest.raises(ValueError):
        BrokerRegistry().set_mesh("", FakeBroker())


def test_a_legacy_row_goes_out_as_a_broadcast() -> None:
    m = outgoing_message(claimed_row(target_spec=None, priority=None, nonce=None, ciphertext=None))
    assert (m.target_spec, m.priority) == ("*", "next")
    assert base64.b64decode(m.ciphertext) == b"hello"
    assert len(base64.b64decode(m.nonce)) == 24
    assert m.request_fingerprint == bytes(range(32)).hex()


def test_an_unencrypted_row_carries_its_payload_with_a_fresh_nonce() -> None:
    a, b = outgoing_message(claimed_row()), outgoing_message(claimed_row())
    assert (a.target_spec, a.priority, base64.b64decode(a.ciphertext)) == ("#general", "now", b"hello")
    assert a.nonce != b.nonce


def test_an_encrypted_row_goes_out_as_stored() -> None:
    m = outgoing_message(claimed_row(nonce="bm9uY2U=", ciphertext="Y3Q="))
    assert (m.nonce, m.ciphertext) == ("bm9uY2U=", "Y3Q=")
    assert m.to_frame() == {
        "type": "send",
        "id": "m-1",
        "client_message_id": "m-1",
        "request_fingerprint": bytes(range(32)).hex(),
        "targetSpec": "#general",
        "priority": "now",
        "nonce": "bm9uY2U=",
        "ciphertext": "Y3Q=",
    }


@given(st.text(), st.text(), st.text(), st.text(), st.text())
def test_a_send_frame_is_the_json_of_its_fields_whatever_they_contain(
    cid: str, target: str, priority: str, nonce: str, ciphertext: str
) -> None:
    message = OutgoingMessage(
        client_message_id=cid,
        request_fingerprint="ab" * 32,
        target_spec=target,
        priority=priority,
        nonce=nonce,
        ciphertext=ciphertext,
    )
    text = message.to_json()
    assert text == encode_json(message.to_frame())
    assert json.loads(text) == message.to_frame()


def test_brokers_removed_from_the_registry_stop_waking_it_and_are_not_kept() -> None:
    reg, wakes = BrokerRegistry(), []
    reg.add_listener(lambda: wakes.append(1))
    mesh = FakeBroker()
    reg.set_mesh("alpha", mesh)
    sessions = []
    for i in range(500):  # sessions that come and go
        session = FakeBroker()
        sessions.append(session)
        key = f"{i:064x}"
        reg.set_session(key, session)
        reg.remove_session(key)
    assert all(not s._listeners for s in sessions), "the registry's open-listener is removed with the broker"
    assert len(reg._subscribed) == 1
    wakes.clear()
    sessions[0].set_open(True)
    assert not wakes, "a removed broker no longer wakes the worker"
    # A broker registered twice keeps its listener until its last removal.
    reg.set_session(SESSION, mesh)
    reg.remove_session(SESSION)
    mesh.set_open(True)
    assert wakes, "still registered as mesh alpha"
    reg.remove_mesh("alpha")
    assert not mesh._listeners


def test_a_broker_replaced_under_its_key_drops_the_registrys_listener() -> None:
    reg, first, second = BrokerRegistry(), FakeBroker(), FakeBroker()
    reg.set_mesh("alpha", first)
    reg.set_mesh("alpha", second)
    assert not first._listeners and len(second._listeners) == 1
    reg.set_session(SESSION, first)
    reg.set_session(SESSION, second)
    assert not first._listeners and len(second._listeners) == 1, "one listener however often it is registered"
