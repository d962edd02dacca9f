"""The Prometheus metrics (SPEC section 11): the collector's names and labels,
its snapshot (no I/O on a scrape), a host application's own registry, the
``/metrics`` endpoint of ``trio-drain run`` scraped during a real drain,
and the Grafana dashboard held to what the collector emits."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trio_drain import (
    DrainConfig,
    MetricsCollector,
    SendResult,
    TrioDrainError,
    generate_secret_key,
    open_outbox,
)
from trio_drain._metrics._server import parse_address, serve_metrics

from .builders import req
from .helpers import FakeBroker, Rig, wait_settled
from .procs import CLI, Broker, fill, stop_all, write_config

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"

#: Every family the collector emits, with its type and labels (SPEC section 11).
FAMILIES = {
    "trio_drain_outbox_rows": ("gauge", {"status"}),
    "trio_drain_outbox_oldest_pending_age_seconds": ("gauge", set()),
    "trio_drain_deliveries": ("counter", {"route", "outcome"}),
    "trio_drain_send_ack_seconds": ("histogram", {"route"}),
    "trio_drain_accept_to_done_seconds": ("histogram", set()),
    "trio_drain_in_flight": ("gauge", set()),
    "trio_drain_window": ("gauge", set()),
    "trio_drain_route_up": ("gauge", {"route"}),
    "trio_drain_route_paused": ("gauge", {"route"}),
}
OUTCOMES = {"acked", "duplicate", "retried", "dead", "given_back"}
STATUSES = {"pending", "inflight", "done", "dead", "aborted"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(text: str) -> Samples:
    """Every sample of a metrics page by sample name, parsed by prometheus_client."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, []).append((dict(s.labels), s.value))
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    (match,) = [v for ls, v in found[name] if all(ls.get(k) == x for k, x in labels.items())]
    return match


def value_or_0(found: Samples, name: str, **labels: str) -> float:
    """`value`, or 0 where the sample is absent (a route not yet known)."""
    matches = [v for ls, v in found.get(name, []) if all(ls.get(k) == x for k, x in labels.items())]
    return matches[0] if matches else 0.0


def scrape(registry: CollectorRegistry) -> Samples:
    return samples(generate_latest(registry).decode())


# -- the collector, in a host application's own registry


async def test_a_host_registry_gets_every_name_and_label_of_the_spec(tmp_path: Path) -> None:
    script_calls = 0

    def script(message: object) -> SendResult | None:
        nonlocal script_calls
        script_calls += 1
        return SendResult.failed("refused", permanent=True) if script_calls == 1 else None

    async with open_outbox(tmp_path / "o.db") as ob, trio.open_nursery() as nursery:
        rig = Rig(ob, nursery, broker=FakeBroker(script=script))
        worker = rig.worker(DrainConfig(max_inflight=4, poll_interval=0.05))
        collector = MetricsCollector(ob, worker, refresh=0.2)
        registry = CollectorRegistry()
        registry.register(collector)
        await nursery.start(worker.run)
        await nursery.start(collector.run)
        await ob.accept_many([req(f"m{i}") for i in range(20)])
        await ob.pause(mesh="beta")
        await wait_settled(ob, 20)
        await trio.sleep(1.5)  # a snapshot after the last outcome
        found = scrape(registry)
        nursery.cancel_scope.cancel()

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    for name, (kind, labels) in FAMILIES.items():
        assert families[name].type == kind, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert {ls["status"]: v for ls, v in found["trio_drain_outbox_rows"]} == {
        "pending": 0,
        "inflight": 0,
        "done": 19,
        "dead": 1,
        "aborted": 0,
    }
    outcomes = {
        ls["outcome"]: v for ls, v in found["trio_drain_deliveries_total"] if ls["route"] == "mesh:alpha"
    }
    assert outcomes == {"acked": 19, "duplicate": 0, "retried": 0, "dead": 1, "given_back": 0}
    assert value(found, "trio_drain_send_ack_seconds_count", route="mesh:alpha") == 20
    assert value(found, "trio_drain_send_ack_seconds_bucket", route="mesh:alpha", le="+Inf") == 20
    assert value(found, "trio_drain_accept_to_done_seconds_count") == 19
    assert value(found, "trio_drain_route_up", route="mesh:alpha") == 1
    assert value(found, "trio_drain_route_paused", route="mesh:beta") == 1
    assert value(found, "trio_drain_route_paused", route="mesh:alpha") == 0
    assert value(found, "trio_drain_window") >= 1
    assert value(found, "trio_drain_in_flight") == 0
    assert value(found, "trio_drain_outbox_oldest_pending_age_seconds") == 0


async def test_a_scrape_reads_the_snapshot_and_never_the_database(tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "o.db") as ob:
        await ob.accept_many([req(f"m{i}") for i in range(3)])
        collector = MetricsCollector(ob)
        registry = CollectorRegistry()
        registry.register(collector)
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            nursery.cancel_scope.cancel()
    # The outbox is closed now: a scrape that touched it would fail. And
    # from another thread, as prometheus_client's own server scrapes.
    scraped: list[Samples] = []
    thread = threading.Thread(target=lambda: scraped.append(scrape(registry)))
    thread.start()
    thread.join(10)
    (found,) = scraped
    assert value(found, "trio_drain_outbox_rows", status="pending") == 3
    assert value(found, "trio_drain_outbox_oldest_pending_age_seconds") >= 0
    assert "trio_drain_in_flight" not in found  # no worker, no worker metrics


async def test_one_collector_a_worker(tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "o.db") as ob, trio.open_nursery() as nursery:
        worker = Rig(ob, nursery).worker()
        MetricsCollector(ob, worker)
        with pytest.raises(TrioDrainError, match="already"):
            MetricsCollector(ob, worker)
        with pytest.raises(TrioDrainError, match="refresh"):
            MetricsCollector(ob, refresh=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9100", ":9100", "::1:9100", "host:port", "host:70000", "[nope]:1"])
def test_malformed_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(TrioDrainError):
        parse_address(text)


# -- `trio-drain run --metrics`, scraped during a real drain


def start_run(db: Path, config: Path, *options: str, log: Path | None = None) -> subprocess.Popen[str]:
    """`trio-drain run` with `options` after the command, its stderr to `log` (or a pipe)."""
    if log is None:
        return subprocess.Popen(
            [*CLI, "run", "--db", str(db), "--config", str(config), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    with log.open("a") as stderr:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*CLI, "run", "--db", str(db), "--config", str(config), *options],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def metrics_url(proc_log: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = re.search(r"metrics at (http://\S+/metrics)", proc_log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no metrics URL in the log:\n{proc_log.read_text()}")


def test_run_serves_metrics_that_move_while_it_drains(tmp_path: Path) -> None:
    broker = Broker(tmp_path, "--ack-delay", "0.02").start()
    db = tmp_path / "o.db"
    fill(db, 600)
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain={"max_inflight": 4})
    config.write_text(config.read_text().replace("[drain]\n", "[drain]\nadaptive = false\n"))
    log = tmp_path / "run.log"
    proc = start_run(db, config, "--metrics", "127.0.0.1:0", "--metrics-refresh", "0.3", log=log)
    try:
        url = metrics_url(log, time.monotonic() + 30)
        pages: list[Samples] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            started = time.perf_counter()
            page = samples(get(url))
            assert time.perf_counter() - started < 1.0
            pages.append(page)
            if value(page, "trio_drain_outbox_rows", status="done") == 600:
                break
            time.sleep(0.3)
        first, last = pages[0], pages[-1]
        done = [value(p, "trio_drain_outbox_rows", status="done") for p in pages]
        acked = [
            value_or_0(p, "trio_drain_deliveries_total", route="mesh:alpha", outcome="acked") for p in pages
        ]
        assert done[-1] == 600, done
        assert len({d for d in done if 0 < d < 600}) >= 2, f"the counts did not move: {done}"
        assert acked == sorted(acked) and acked[-1] == 600
        assert value(first, "trio_drain_outbox_rows", status="pending") > value(
            last, "trio_drain_outbox_rows", status="pending"
        )
        assert value(last, "trio_drain_route_up", route="mesh:alpha") == 1
        assert value(last, "trio_drain_window") == 4
        assert value(last, "trio_drain_send_ack_seconds_count", route="mesh:alpha") == 600
        # The broker waits 20 ms before each ack: no answer sooner.
        assert value(last, "trio_drain_send_ack_seconds_bucket", route="mesh:alpha", le="0.01") == 0
        assert value(last, "trio_drain_accept_to_done_seconds_count") == 600
        assert "process_cpu_seconds_total" in last  # and the process's own
    finally:
        stop_all(proc)
        broker.stop()
    assert proc.returncode == 0, log.read_text()


def test_run_refuses_a_metrics_address_in_use(tmp_path: Path) -> None:
    import socket

    db = tmp_path / "o.db"
    fill(db, 1)
    config = write_config(tmp_path / "c.toml", "ws://127.0.0.1:9/ws", generate_secret_key())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_run(db, config, "--metrics", f"127.0.0.1:{port}")
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert "cannot serve metrics" in stderr


# -- the Grafana dashboard


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(board)
    return exprs


#: Labels Prometheus itself puts on every series it scrapes (the target's).
TARGET_LABELS = {"instance", "job"}


def emitted(found: Samples) -> dict[str, set[str]]:
    """Sample names the collector emits, with the labels each carries."""
    names: dict[str, set[str]] = {}
    for name, rows in found.items():
        for labels, _ in rows:
            names.setdefault(name, set()).update(labels)
    return names


def used(exprs: Iterable[str]) -> list[tuple[str, set[str]]]:
    """Each metric a query names, with the labels it matches on or groups by."""
    out = []
    for expr in exprs:
        groups = set()
        for found in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            groups |= {g.strip() for g in found.group(1).split(",") if g.strip()}
        for found in re.finditer(r"\b(trio_drain_[a-z_]+)\b(\{[^}]*\})?", expr):
            matchers = set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", found.group(2) or ""))
            out.append((found.group(1), matchers | groups))
    return out


async def test_the_dashboard_queries_only_names_and_labels_the_collector_emits(tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "o.db") as ob, trio.open_nursery() as nursery:
        rig = Rig(ob, nursery)
        worker = rig.worker()
        collector = MetricsCollector(ob, worker, refresh=0.2)
        registry = CollectorRegistry()
        registry.register(collector)
        await nursery.start(worker.run)
        await nursery.start(collector.run)
        await ob.accept_many([req(f"m{i}") for i in range(5)])
        await wait_settled(ob, 5)
        await trio.sleep(1.2)
        found = emitted(scrape(registry))
        nursery.cancel_scope.cancel()
    exprs = dashboard_queries()
    assert len(exprs) >= 6
    checked = used(exprs)
    names = {name for name, _ in checked}
    # What the dashboard is for: backlog, rate, oldest pending age, dead rate, window, route up.
    for needed in (
        "trio_drain_outbox_rows",
        "trio_drain_deliveries_total",
        "trio_drain_outbox_oldest_pending_age_seconds",
        "trio_drain_window",
        "trio_drain_route_up",
    ):
        assert needed in names, needed
    for name, labels in checked:
        assert name in found, f"the dashboard queries {name}, which the collector does not emit"
        extra = labels - found[name] - TARGET_LABELS
        assert not extra, f"the dashboard uses labels {extra} that {name} does not have"
    for expr in exprs:  # a label value the dashboard picks must be one the collector gives
        for status in re.findall(r'status="([a-z]+)"', expr):
            assert status in STATUSES
        for outcome in re.findall(r'outcome="([a-z_]+)"', expr):
            assert outcome in OUTCOMES


# -- the endpoint itself


async def ask(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        if not request:
            await stream.send_eof()  # a client that connects and goes away
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


async def test_the_endpoint_answers_get_head_and_refuses_the_rest(tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "o.db") as ob, trio.open_nursery() as nursery:
        collector = MetricsCollector(ob)
        registry = CollectorRegistry()
        registry.register(collector)
        await nursery.start(collector.run)
        answered: list[float] = []
        _, port = await nursery.start(
            functools.partial(serve_metrics, registry, "127.0.0.1", 0, on_answered=answered.append)
        )
        page = await ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = page.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"text/plain" in head
        assert 'trio_drain_outbox_rows{status="pending"} 0.0' in body.decode()
        open_metrics = await ask(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        assert b"application/openmetrics-text" in open_metrics.split(b"\r\n\r\n")[0]
        assert open_metrics.rstrip().endswith(b"# EOF")
        head_only = await ask(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200") and head_only.endswith(b"\r\n\r\n")
        assert (await ask(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (
            await ask(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        ).startswith(b"HTTP/1.1 405")
        assert (await ask(port, b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert await ask(port, b"") == b""
        assert len(answered) == 5
        nursery.cancel_scope.cancel()


async def test_an_outbox_that_cannot_be_read_leaves_the_last_counts_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        async with open_outbox(tmp_path / "o.db") as ob:
            await ob.accept(req("m"))
            collector = MetricsCollector(ob, refresh=0.1)
            registry = CollectorRegistry()
            registry.register(collector)
            await nursery.start(collector.run)
        await trio.sleep(1.5)  # counts due again, and again, on a closed outbox
        found = scrape(registry)
        nursery.cancel_scope.cancel()
    assert value(found, "trio_drain_outbox_rows", status="pending") == 1
    warnings = [r for r in caplog.records if "cannot count the outbox" in r.getMessage()]
    assert len(warnings) == 1
