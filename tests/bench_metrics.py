"""The metrics section of the benchmark (SPEC section 9): ``/metrics`` answers
within 50 ms with 1,000,000 rows in the outbox, and a scrape a second costs
the drain under 2% of its rate.

    python -m tests.benchmark --only metrics [--quick] [--runs N]

Scrapes come from a process of their own, as Prometheus's would, so the
figures hold what serving a scrape costs the drain's process and nothing
of the scraper's.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from trio_drain import BrokerRegistry, DrainConfig, DrainWorker, MetricsCollector, open_outbox
from trio_drain._metrics._server import serve_metrics

from .benchmark import BrokerProcess, connected, fill, percentile

#: A scraper in a process of its own: GET the URL every `interval` seconds
#: and print each answer's latency (seconds) and size, until killed.
_SCRAPER = """
import sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
while True:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as answer:
        size = len(answer.read())
    print(time.perf_counter() - started, size, flush=True)
    time.sleep(max(0.0, interval - (time.perf_counter() - started)))
"""


def spawn_scraper(url: str, interval: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _SCRAPER, url, str(interval)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def stop_scraper(proc: subprocess.Popen[str]) -> list[float]:
    """Stop the scraper; the latencies it measured (seconds)."""
    proc.kill()
    out, _ = proc.communicate(timeout=30)
    return [float(line.split()[0]) for line in out.splitlines() if line.strip()]


async def million_rows(db: str, rows: int) -> None:
    """An outbox of `rows` pending rows, quickly: 10,000 accepted the usual
    way, then copied under new ids by SQL."""
    seed = min(rows, 10_000)
    await fill(db, seed)

    def copy() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            columns = [r[1] for r in conn.execute("PRAGMA table_xinfo(outbox)") if r[6] == 0]
            values = ", ".join(
                f"{c} || '-' || :k" if c in ("id", "client_message_id") else c for c in columns
            )
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("BEGIN")
            for k in range(1, rows // seed):
                conn.execute(
                    f"INSERT INTO outbox ({', '.join(columns)}) SELECT {values} FROM outbox WHERE rowid <= {seed}",
                    {"k": k},
                )
            conn.execute("COMMIT")
        finally:
            conn.close()

    await trio.to_thread.run_sync(copy)


async def scrape_latency(folder: str, rows: int, seconds: float) -> dict[str, Any]:
    """Scrapes ten a second of `trio-drain run`'s metrics (the same collector
    and server) over an outbox of `rows` rows, while a worker drains it."""
    db = str(Path(folder) / "million.db")
    await million_rows(db, rows)
    with BrokerProcess() as broker:
        async with open_outbox(db) as outbox, trio.open_nursery() as nursery:
            started = time.perf_counter()
            overview = await outbox.overview(counts=True, routes=False, dead_rows=0)
            count_s = time.perf_counter() - started
            assert overview.counts is not None and sum(overview.counts.values()) == rows
            registry = BrokerRegistry()
            registry.set_mesh("bench", await connected(nursery, broker.url))
            worker = DrainWorker(outbox, registry, DrainConfig())
            collector = MetricsCollector(outbox, worker)
            metrics = CollectorRegistry()
            metrics.register(collector)
            answers: list[float] = []
            host, port = await nursery.start(
                functools.partial(serve_metrics, metrics, "127.0.0.1", 0, on_answered=answers.append)
            )
            await nursery.start(collector.run)
            await nursery.start(worker.run)
            scraper = spawn_scraper(f"http://{host}:{port}/metrics", 0.1)
            await trio.sleep(seconds)
            latencies = stop_scraper(scraper)
            drained = worker.statistics().acked
            nursery.cancel_scope.cancel()
    return {
        "rows": rows,
        "scrapes": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "server_p50_ms": percentile(answers, 50) * 1000,
        "server_p99_ms": percentile(answers, 99) * 1000,
        "server_max_ms": max(answers) * 1000,
        "target_ms": 50.0,
        "load_average": os.getloadavg()[0],
        "drained_meanwhile": drained,
        "count_ms": count_s * 1000,
        "count_every_s": max(collector.refresh, count_s / 0.05),
    }


async def drain_with(url: str, db: str, n: int, *, metrics: bool) -> tuple[float, float]:
    """Rows a second for a worker draining `n` rows, and this process's CPU
    seconds a row; with `metrics`, served (as by ``run --metrics``) and
    scraped once a second by another process."""
    async with open_outbox(db) as outbox, trio.open_nursery() as nursery:
        registry = BrokerRegistry()
        registry.set_mesh("bench", await connected(nursery, url))
        worker = DrainWorker(outbox, registry, DrainConfig())
        done = trio.Event()
        settled = 0

        def on_completion(c: Any) -> None:
            nonlocal settled
            settled += 1
            if settled >= n:
                done.set()

        worker.on_completion = on_completion
        scraper = None
        if metrics:
            collector = MetricsCollector(outbox, worker)
            served = CollectorRegistry()
            served.register(collector)
            host, port = await nursery.start(serve_metrics, served, "127.0.0.1", 0)
            await nursery.start(collector.run)
            scraper = spawn_scraper(f"http://{host}:{port}/metrics", 1.0)
        started, cpu = time.perf_counter(), time.process_time()
        nursery.start_soon(worker.run)
        await done.wait()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        if scraper is not None:
            scrapes = stop_scraper(scraper)
            assert len(scrapes) >= int(elapsed) - 1, (len(scrapes), elapsed)
        nursery.cancel_scope.cancel()
    return n / elapsed, cpu / n


async def scrape_cost(folder: str, n: int, pairs: int) -> dict[str, Any]:
    """Drains of `n` rows without and with metrics scraped once a second,
    alternating (ABBA...) so that a slow spell of the machine falls on both."""
    plain: list[tuple[float, float]] = []
    scraped: list[tuple[float, float]] = []
    with BrokerProcess() as broker:
        for i in range(pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for metrics in order:
                db = str(Path(folder) / f"ab-{time.time_ns()}.db")
                await fill(db, n)
                (scraped if metrics else plain).append(await drain_with(broker.url, db, n, metrics=metrics))
    rate_ratios = [s[0] / p[0] for s, p in zip(scraped, plain, strict=True)]
    cpu_ratios = [s[1] / p[1] for s, p in zip(scraped, plain, strict=True)]
    return {
        "rows": n,
        "pairs": pairs,
        "plain_rps": statistics.median(r for r, _ in plain),
        "scraped_rps": statistics.median(r for r, _ in scraped),
        "cost": 1 - statistics.median(rate_ratios),
        "rate_ratios": rate_ratios,
        "plain_cpu_us_per_row": statistics.median(c for _, c in plain) * 1e6,
        "scraped_cpu_us_per_row": statistics.median(c for _, c in scraped) * 1e6,
        "cpu_cost": statistics.median(cpu_ratios) - 1,
        "cpu_ratios": cpu_ratios,
        "target_cost": 0.02,
        "load_average": os.getloadavg()[0],
    }


async def metrics_section(quick: bool, runs: int) -> dict[str, Any]:
    """The whole metrics section."""
    with tempfile.TemporaryDirectory(prefix="trio-drain-bench-") as folder:
        latency = await scrape_latency(folder, 200_000 if quick else 1_000_000, 10.0 if quick else 30.0)
    with tempfile.TemporaryDirectory(prefix="trio-drain-bench-") as folder:
        cost = await scrape_cost(
            folder, 20_000 if quick else 100_000, max(2, runs) if quick else max(4, runs)
        )
    return {"scrape": latency, "cost": cost}


def metrics_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    m = r["metrics"]
    s, c = m["scrape"], m["cost"]
    return [
        (
            f"/metrics with {s['rows']:,} rows, during a drain: p50 / p99 / max (ms)",
            f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} / {s['max_ms']:.1f}",
            f"{s['scrapes']} scrapes by another process (target < 50)",
        ),
        (
            "  of which the drain's process, request read to answer sent (ms)",
            f"{s['server_p50_ms']:.1f} / {s['server_p99_ms']:.1f} / {s['server_max_ms']:.1f}",
            f"load average {s['load_average']:.1f} on {os.cpu_count()} cores",
        ),
        (
            "  the background count of those rows (ms), and how often it runs (s)",
            f"{s['count_ms']:.0f}",
            f"every {s['count_every_s']:.1f} s",
        ),
        (
            f"drain of {c['rows']:,} rows, scraped once a second vs not (rows/s)",
            f"{c['scraped_rps']:,.0f} / {c['plain_rps']:,.0f}",
            f"costs {c['cost'] * 100:.1f}% of the rate (median of {c['pairs']} pairs; target < 2%)",
        ),
        (
            "  CPU of the drain's process a row, scraped vs not (us)",
            f"{c['scraped_cpu_us_per_row']:.1f} / {c['plain_cpu_us_per_row']:.1f}",
            f"costs {c['cpu_cost'] * 100:.1f}% more CPU a row (median of the pairs' ratios)",
        ),
    ]


if __name__ == "__main__":
    result = trio.run(metrics_section, "--quick" in sys.argv, 3)
    print(json.dumps(result, indent=2))
