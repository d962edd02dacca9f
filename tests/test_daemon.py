"""`trio-drain run` as an operator meets it (SPEC section 8): started in an
outage it waits the broker out; it refuses to start only for what retrying
cannot mend; its shutdown is bounded whatever the brokers do; a second
signal exits at once; and nothing a user can do ends in a traceback."""

from __future__ import annotations

import functools
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from trio_drain import ConfigError, MeshIdentity, WebSocketBroker, generate_secret_key
from trio_drain._brokers._identity import public_key_hex

from .helpers import self_signed_certificate
from .procs import CLI, Broker, assert_clean_error, counts, fill, run, start_run, stop_all, wait_for_done

QUICK = {"poll_interval": 0.05, "lease": 5.0, "ack_timeout": 2.0, "maintenance_interval": 0.5}


def config_for(path: Path, meshes: dict[str, str], secret: str, **drain: object) -> Path:
    """A config with one [[mesh]] per slug -> broker URL."""
    settings = {**QUICK, **drain}
    text = "[drain]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    for slug, url in meshes.items():
        text += (
            f'\n[[mesh]]\nslug = "{slug}"\nmesh_id = "mesh-{slug}"\nmember_id = "member-1"\n'
            f'broker_url = "{url}"\nsecret_key = "{secret}"\n'
        )
    path.write_text(text)
    return path


def fill_meshes(db: Path, per_mesh: dict[str, int]) -> None:
    from trio_drain import SendRequest, open_outbox

    async def go() -> None:
        async with open_outbox(db) as ob:
            await ob.accept_many(
                [
                    SendRequest(mesh=slug, target_spec="*", payload=b"x", client_message_id=f"{slug}-{i}")
                    for slug, n in per_mesh.items()
                    for i in range(n)
                ]
            )

    trio.run(go)


def test_run_started_during_an_outage_waits_drains_the_other_routes_and_then_everything(
    tmp_path: Path,
) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "down").mkdir()
    up = Broker(tmp_path / "up").start()
    down = Broker(tmp_path / "down")  # not started yet: its port is closed
    db = tmp_path / "o.db"
    fill_meshes(db, {"alpha": 300, "beta": 300})
    config = config_for(tmp_path / "c.toml", {"alpha": down.url, "beta": up.url}, generate_secret_key())
    worker = start_run(db, config)
    try:
        wait_for_done(db, 300, 20, worker)
        assert worker.poll() is None, "it must not exit because one broker is down"
        assert counts(db)["done"] == 300, "beta's rows drained meanwhile"
        time.sleep(1.5)
        down.start()
        returned = time.monotonic()
        wait_for_done(db, 600, 40, worker)
        drained_after = time.monotonic() - returned
        (err,) = stop_all(worker)
    finally:
        up.stop()
        down.stop()
    assert counts(db)["done"] == 600, err
    # Backoff 1, 2, 4 s (jittered up to 20%) by then: the next attempt within 4.8 s, plus 2 s to drain.
    assert drained_after < 4.8 + 2, drained_after
    assert "not reachable" in err and "Traceback" not in err
    assert worker.returncode == 0


def test_run_refuses_to_start_when_the_broker_refuses_its_hello(tmp_path: Path) -> None:
    members = tmp_path / "members.json"
    members.write_text(json.dumps({"mesh-alpha": {"member-1": public_key_hex(generate_secret_key())}}))
    broker = subprocess.Popen(
        [*CLI, "broker", "serve", "--members", str(members), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert broker.stdout is not None
        url = broker.stdout.readline().split()[-1]
        db = tmp_path / "o.db"
        fill(db, 3)
        config = config_for(tmp_path / "c.toml", {"alpha": url}, generate_secret_key())
        result = run("run", "--db", str(db), "--config", str(config), timeout=30)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.communicate(timeout=30)
    assert_clean_error(result, 1, "hello refused: not_a_member")
    assert counts(db)["pending"] == 3


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ws://127.0.0.1:99999/ws", "out of range"),
        ("ws://127.0.0.1:-1/ws", "malformed"),
        ("http://127.0.0.1:8765/ws", "ws:// or wss://"),
        ("ws:///ws", "no host"),
    ],
)
def test_a_malformed_broker_url_is_a_config_error_in_one_line(
    tmp_path: Path, url: str, fragment: str
) -> None:
    db = tmp_path / "o.db"
    fill(db, 1)
    config = config_for(tmp_path / "c.toml", {"alpha": url}, generate_secret_key())
    assert_clean_error(run("run", "--db", str(db), "--config", str(config)), 2, fragment)


@pytest.fixture
def untrusted_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate no client trusts, and its key."""
    return self_signed_certificate(tmp_path)


async def test_a_certificate_that_fails_verification_is_fatal_not_an_outage(
    untrusted_certificate: tuple[Path, Path],
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*untrusted_certificate)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, handler, 0, server_context, host="127.0.0.1")
        )
        port = listener.transport_listener.socket.getsockname()[1]
        broker = WebSocketBroker(
            f"wss://127.0.0.1:{port}/ws",
            MeshIdentity(mesh_id="m", member_id="u", secret_key=generate_secret_key()),
        )
        await nursery.start(broker.run)
        assert not broker.is_open()
        assert broker.fatal_error is not None and "certificate" in broker.fatal_error
        nursery.cancel_scope.cancel()


def test_an_unknown_transport_is_refused_when_the_broker_is_made() -> None:
    with pytest.raises(ConfigError, match="unknown transport"):
        WebSocketBroker(
            "ws://127.0.0.1:1/ws",
            MeshIdentity(mesh_id="m", member_id="u", secret_key=generate_secret_key()),
            transport="x",  # type: ignore[arg-type]
        )


# -- stopping ---------------------------------------------------------------------------------


def wait_for_receipts(broker: Broker, n: int, seconds: float = 20) -> None:
    """Until the broker has received n send frames."""
    deadline = time.monotonic() + seconds
    while not broker.receipts.exists() or sum(broker.sent().values()) < n:
        assert time.monotonic() < deadline, "the sends never arrived"
        time.sleep(0.05)


def run_unanswered(
    tmp_path: Path, rows: int, *, shutdown_timeout: float
) -> tuple[Broker, Path, subprocess.Popen[str]]:
    """A broker that acks nothing, an outbox of `rows` rows, and `trio-drain
    run` sending them 16 at a time, under an ack timeout and a lease too
    long to matter."""
    broker = Broker(tmp_path, "--drop-ack-rate", "1.0").start()
    db = tmp_path / "o.db"
    fill(db, rows)
    config = config_for(
        tmp_path / "c.toml",
        {"alpha": broker.url},
        generate_secret_key(),
        shutdown_timeout=shutdown_timeout,
        ack_timeout=30.0,
        lease=60.0,
        max_inflight=16,
    )
    return broker, db, start_run(db, config)


def test_shutdown_is_bounded_with_a_broker_that_never_acks_and_loses_nothing(tmp_path: Path) -> None:
    broker, db, worker = run_unanswered(tmp_path, 50, shutdown_timeout=1.5)
    try:
        wait_for_receipts(broker, 16)  # the whole window is out, and will never be answered
        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        took = time.monotonic() - asked
    finally:
        broker.stop()
    assert worker.returncode == 0, err
    assert took < 1.5 + 1.5, took  # shutdown_timeout, plus the interpreter's exit
    assert counts(db) == {"pending": 50, "inflight": 0, "done": 0, "dead": 0, "aborted": 0}
    assert "Traceback" not in err


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    broker, db, worker = run_unanswered(tmp_path, 20, shutdown_timeout=60.0)
    try:
        wait_for_receipts(broker, 16)
        worker.send_signal(signal.SIGINT)
        time.sleep(0.3)
        asked = time.monotonic()
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
        took = time.monotonic() - asked
    finally:
        broker.stop()
    assert worker.returncode == 130 and took < 2.0, (took, err)
    assert err.strip().splitlines()[-1].startswith("trio-drain: interrupted again")
    assert "Traceback" not in err
    assert counts(db)["inflight"] == 16, "the rows come back through their lease"


def test_an_interrupt_while_run_connects_is_one_line_and_status_130(tmp_path: Path) -> None:
    # A listener that never answers: the connection attempt hangs until its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        db = tmp_path / "o.db"
        fill(db, 1)
        config = config_for(
            tmp_path / "c.toml", {"alpha": f"ws://127.0.0.1:{port}/ws"}, generate_secret_key()
        )
        worker = start_run(db, config)
        time.sleep(1.0)
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 130, err
    assert err.strip() == "trio-drain: interrupted before draining began"


def test_an_interrupt_during_the_demo_is_one_line_and_status_130(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [*CLI, "demo", "--messages", "2000000", "--db", str(tmp_path / "d.db")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == 130 and err.strip() == "trio-drain: error: interrupted", err


# -- errors a user can cause ----------------------------------------------------------------


def test_broker_serve_on_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("broker", "serve", "--open", "--port", str(port))
    assert_clean_error(result, 1, f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("port", ["-1", "99999", "http"])
def test_broker_serve_refuses_a_port_out_of_range(port: str) -> None:
    result = run("broker", "serve", "--open", "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--port" in result.stderr


def test_broker_serve_on_a_host_that_does_not_resolve_is_one_line() -> None:
    assert_clean_error(
        run("broker", "serve", "--open", "--host", "no-such-host.invalid", "--port", "0"),
        1,
        "cannot listen on no-such-host.invalid",
    )


def test_broker_serve_with_a_database_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    assert_clean_error(
        run("broker", "serve", "--open", "--port", "0", "--db", str(tmp_path / "no" / "x.db")),
        1,
        "cannot open the broker's database",
    )


def test_send_takes_a_message_that_is_not_utf8_as_its_bytes_and_refuses_such_a_target(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    raw = b"caf\xe9 \xff"
    done = subprocess.run(
        [*CLI, "send", "--db", str(db), "--mesh", "alpha", "--to", "*", "--client-id", "b-1", "--json", raw],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        [*CLI, "outbox", "inspect", "--db", str(db), "--json", "b-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(shown.stdout)["payload_hex"] == raw.hex()
    bad = subprocess.run(
        [*CLI, "send", "--db", str(db), "--mesh", "alpha", "--to", b"\xff", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_error(bad, 2, "--to is not valid UTF-8")
    assert sys.getfilesystemencoding() == "utf-8"


def test_brokers_that_hang_at_connect_delay_the_start_once_not_once_each(tmp_path: Path) -> None:
    """Two brokers that take TCP and never answer the upgrade hold `run`'s
    start for one connect timeout (5 s), not one each: first attempts run
    at once."""
    with socket.socket() as silent_a, socket.socket() as silent_b:
        for silent in (silent_a, silent_b):
            silent.bind(("127.0.0.1", 0))
            silent.listen()
        (tmp_path / "up").mkdir()
        up = Broker(tmp_path / "up").start()
        db = tmp_path / "o.db"
        fill_meshes(db, {"gamma": 50})
        urls = {
            "alpha": f"ws://127.0.0.1:{silent_a.getsockname()[1]}/ws",
            "beta": f"ws://127.0.0.1:{silent_b.getsockname()[1]}/ws",
            "gamma": up.url,
        }
        config = config_for(tmp_path / "c.toml", urls, generate_secret_key())
        began = time.monotonic()
        worker = start_run(db, config)
        try:
            wait_for_done(db, 50, 30, worker)
            took = time.monotonic() - began
            (err,) = stop_all(worker)
        finally:
            up.stop()
    assert counts(db)["done"] == 50, err
    assert took < 5 + 3, f"{took:.1f}s: the two hanging brokers were waited for one after the other"
