"""The PostgreSQL back end side by side with its peers (issue 20): `nox -s
bench -- --only peers`, also part of the full run.

PgQueuer (and Procrastinate's enqueues, for reference, where it is
installed: both come with the `bench` extra) on the same PostgreSQL server (fsync on) in the
same run, in interleaved rounds: every round runs each side once on fresh
databases, and every figure is the median of the per-round ratios, so a
slow spell of the shared machine lands on both sides. Beside each rate is
the CPU it cost per row: the client's (this process, or the drain
processes and the broker) and the server's (every PostgreSQL process).

- enqueue one at a time: `Outbox.accept` (durable: synchronous_commit on)
  against PgQueuer's `Queries.enqueue` of one job;
- enqueue in batches of 1,000: `accept_many` against `enqueue` of lists;
  and ours once more for batches whose every id is taken (a producer
  retrying whole batches: no peer has the idempotency table to compare);
- 64 concurrent `accept` callers against one;
- drain a backlog with one and with two processes, each with its
  defaults: `trio-drain run` (a WebSocket frame per row to the reference
  broker, in its own process) against PgQueuer's `QueueManager` running a
  no-op job (its defaults: batch of 10, uvloop as its command line runs);
- the claim's cost with a small backlog and with 1,000,000 rows pending,
  alternating, on a table whose statistics the claims meet as they are.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from trio_drain import SendRequest, generate_secret_key, open_outbox

from .pg import PostgresServer, find_binaries

PAYLOAD = b"x" * 64


def server_cpu(server: PostgresServer) -> float:
    """CPU seconds the server has used: the postmaster, the sessions it has
    ended (reaped) and the ones still running (Linux)."""
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(int(x) for x in _stat(pid)[11:15])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            fields = _stat(int(entry))
            if fields and int(fields[1]) == pid:
                total += int(fields[11]) + int(fields[12])
    return total / tick


def process_cpu(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _requests(prefix: str, n: int) -> list[SendRequest]:
    return [
        SendRequest(mesh="bench", target_spec="#bench", payload=PAYLOAD, client_message_id=f"{prefix}-{i}")
        for i in range(n)
    ]


def _figure(n: int, wall: float, client: float, server: float) -> dict[str, float]:
    return {"rate": n / wall, "client_us": client / n * 1e6, "server_us": server / n * 1e6}


# -- enqueue, ours


async def ours_enqueue(
    url: str, srv: Callable[[], float], n: int, *, batch: int, callers: int = 1, again: bool = False
) -> dict[str, float]:
    """`accept` one at a time (batch 1, `callers` at once) or `accept_many`;
    `again`: batches accepted once before, untimed, so that every id is
    taken (a producer retrying whole batches)."""
    requests = _requests(f"e{time.time_ns()}", n)
    async with open_outbox(url) as outbox:
        await outbox.accept(_requests(f"w{time.time_ns()}", 1)[0])  # connected, statements known
        if again:
            for start in range(0, n, batch):
                await outbox.accept_many(requests[start : start + batch])
        s0, c0, t0 = srv(), time.process_time(), time.perf_counter()
        if batch > 1:
            for start in range(0, n, batch):
                await outbox.accept_many(requests[start : start + batch])
        else:
            it = iter(requests)

            async def caller() -> None:
                for request in it:
                    await outbox.accept(request)

            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(caller)
        wall = time.perf_counter() - t0
        return _figure(n, wall, time.process_time() - c0, srv() - s0)


# -- enqueue, PgQueuer (asyncio, in a thread of its own)


def _asyncio_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # PgQueuer's command line does the same
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _pgq_queries(url: str) -> tuple[Any, Any]:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(conn))
    if not await queries.has_table("pgqueuer"):
        await queries.install()
    return conn, queries


def pgq_enqueue(url: str, srv: Callable[[], float], n: int, *, batch: int) -> dict[str, float]:
    async def go() -> dict[str, float]:
        conn, queries = await _pgq_queries(url)
        try:
            await queries.enqueue("bench", PAYLOAD)
            s0, c0, t0 = srv(), time.process_time(), time.perf_counter()
            if batch > 1:
                for start in range(0, n, batch):
                    k = min(batch, n - start)
                    await queries.enqueue(["bench"] * k, [PAYLOAD] * k, [0] * k)
            else:
                for _ in range(n):
                    await queries.enqueue("bench", PAYLOAD)
            wall = time.perf_counter() - t0
            return _figure(n, wall, time.process_time() - c0, srv() - s0)
        finally:
            await conn.close()

    return _asyncio_run(go())  # type: ignore[no-any-return]


# -- enqueue, Procrastinate (for reference)


_PROCRASTINATE_APP = """
import procrastinate
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo={url!r}))

@app.task(name="bench", queue="bench")
async def bench(**kwargs):
    pass
"""


def _procrastinate_app(url: str, folder: Path) -> Any:
    """A Procrastinate app with a no-op task, importable by its worker."""
    module = folder / f"procrastinate_bench_{abs(hash(url))}.py"
    module.write_text(_PROCRASTINATE_APP.format(url=url))
    sys.path.insert(0, str(folder))
    try:
        namespace: dict[str, Any] = {"__name__": module.stem}
        exec(compile(module.read_text(), str(module), "exec"), namespace)
    finally:
        sys.path.remove(str(folder))
    return namespace


def procrastinate_enqueue(
    url: str, folder: Path, srv: Callable[[], float], n: int, *, batch: int
) -> dict[str, float]:
    namespace = _procrastinate_app(url, folder)
    app, task = namespace["app"], namespace["bench"]

    async def go() -> dict[str, float]:
        async with app.open_async():
            try:
                await app.schema_manager.apply_schema_async()
            except Exception:  # applied by an earlier round on this database
                pass
            await task.defer_async()
            s0, c0, t0 = srv(), time.process_time(), time.perf_counter()
            if batch > 1:
                for start in range(0, n, batch):
                    await task.batch_defer_async(*({} for _ in range(min(batch, n - start))))
            else:
                for _ in range(n):
                    await task.defer_async()
            wall = time.perf_counter() - t0
            return _figure(n, wall, time.process_time() - c0, srv() - s0)

    return asyncio.run(go())


# -- drains


_PGQ_WORKER = """
import asyncio, sys
import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("bench")
    async def bench(job):
        pass

    await pgq.run()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


async def _drain(
    procs: list[subprocess.Popen[str]],
    remaining: Callable[[], int],
    n: int,
    srv: Callable[[], float],
    extra: list[int],
) -> dict[str, float]:
    """Wait for `remaining()` to reach 0; timed from the first row done to
    the last, so that start-up is not counted."""
    first: tuple[float, int, float, float] | None = None
    deadline = time.monotonic() + 900
    pids = [p.pid for p in procs] + extra
    try:
        while time.monotonic() < deadline:
            left = await trio.to_thread.run_sync(remaining)
            now = time.perf_counter()
            if first is None and left < n:
                first = (now, n - left, srv(), sum(process_cpu(pid) for pid in pids))
            if left == 0:
                break
            if all(p.poll() is not None for p in procs):
                raise RuntimeError("every drain process exited: " + (procs[0].communicate()[1] or ""))
            await trio.sleep(0.2)  # a count of the backlog costs the server too: rarely
        else:
            raise RuntimeError(f"{n} rows not drained in time")
        assert first is not None
        rows = n - first[1]
        wall = now - first[0]
        return _figure(rows, wall, sum(process_cpu(pid) for pid in pids) - first[3], srv() - first[2])
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def _count(url: str, sql: str) -> Callable[[], int]:
    import psycopg

    conn = psycopg.connect(url, autocommit=True)

    def remaining() -> int:
        found = conn.execute(sql).fetchone()
        assert found is not None
        return int(found[0])

    return remaining


async def ours_drain(
    url: str, srv: Callable[[], float], n: int, workers: int, broker: Any, folder: Path
) -> dict[str, float]:
    """`trio-drain run` processes with the default DrainConfig."""
    config = folder / "defaults.toml"
    config.write_text(
        f'[[mesh]]\nslug = "bench"\nmesh_id = "mesh-bench"\nmember_id = "member-1"\n'
        f'broker_url = "{broker.url}"\nsecret_key = "{generate_secret_key()}"\n'
    )
    async with open_outbox(url, durability="normal") as outbox:
        for start in range(0, n, 5000):
            await outbox.accept_many(_requests(f"d{start}", min(5000, n - start)))
    procs = [
        _spawn([sys.executable, "-m", "trio_drain", "run", "--db", url, "--config", str(config)])
        for _ in range(workers)
    ]
    remaining = _count(url, "SELECT count(*) FROM outbox WHERE status IN ('pending', 'inflight')")
    assert broker.proc is not None
    return await _drain(procs, remaining, n, srv, [broker.proc.pid])


async def pgq_drain(
    url: str, srv: Callable[[], float], n: int, workers: int, folder: Path
) -> dict[str, float]:
    """PgQueuer's QueueManager (its defaults) running a no-op job."""

    async def fill() -> None:
        conn, queries = await _pgq_queries(url)
        try:
            for start in range(0, n, 5000):
                k = min(5000, n - start)
                await queries.enqueue(["bench"] * k, [PAYLOAD] * k, [0] * k)
        finally:
            await conn.close()

    await trio.to_thread.run_sync(_asyncio_run, fill())
    script = folder / "pgq_worker.py"
    script.write_text(_PGQ_WORKER)
    procs = [_spawn([sys.executable, str(script), url]) for _ in range(workers)]
    remaining = _count(url, "SELECT count(*) FROM pgqueuer WHERE status IN ('queued', 'picked')")
    return await _drain(procs, remaining, n, srv, [])


# -- claim cost with a huge backlog


async def claim_flatness(server: PostgresServer, rows: int, cycles: int = 300) -> dict[str, float]:
    """Median claim (of 128) on a small backlog and on `rows` pending,
    alternating, each claim's rows completed at once; neither table has
    been analyzed when the claims start."""
    from trio_drain import _lifecycle

    small, large = server.create_database(), server.create_database()
    small_rows = 40_000
    for url, n in ((small, small_rows), (large, rows)):
        async with open_outbox(url, durability="normal") as outbox:
            for start in range(0, n, 10_000):
                await outbox.accept_many(_requests(f"b{start}", min(10_000, n - start)))
    times: dict[str, list[float]] = {small: [], large: []}
    async with open_outbox(small, durability="normal") as a, open_outbox(large, durability="normal") as b:
        for k in range(cycles):
            for url, outbox in ((small, a), (large, b)):
                t = time.perf_counter()
                claimed = await outbox.claim(limit=128, lease_ms=60_000, max_age_ms=10**12, token=f"t{k}")
                times[url].append(time.perf_counter() - t)
                await outbox.complete([_lifecycle.on_ack(r, broker_message_id="b", now=0) for r in claimed])
    first = max(times[large][:10])
    s, g = statistics.median(times[small]), statistics.median(times[large])
    return {
        "rows": rows,
        "small_rows": small_rows,
        "claim_ms_small": s * 1000,
        "claim_ms_large": g * 1000,
        "ratio": g / s,
        "slowest_of_first_ten_ms_large": first * 1000,
    }


# -- the section


def _ratio(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> float:
    return statistics.median(a["rate"] / b["rate"] for a, b in zip(ours, theirs, strict=True))


def _median(figures: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(f[k] for f in figures) for k in figures[0]}


async def peers(folder: str, broker: Any, *, quick: bool, rounds: int) -> dict[str, Any]:
    """Every comparison, interleaved by round; see the module's docstring."""
    bindir = find_binaries()
    if bindir is None:
        return {"skipped": "PostgreSQL is not installed"}
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return {"skipped": "PgQueuer is not installed: pip install -e .[bench]"}
    try:
        import procrastinate  # noqa: F401

        with_procrastinate = True
    except ImportError:
        with_procrastinate = False
    work = Path(folder)
    n_one = 500 if quick else 2000
    n_many = 20_000 if quick else 50_000
    n_drain = 10_000 if quick else 50_000
    server = PostgresServer(bindir, fsync=True).start()

    def srv() -> float:
        return server_cpu(server)

    got: dict[str, list[dict[str, float]]] = {}

    def note(key: str, figure: dict[str, float]) -> None:
        got.setdefault(key, []).append(figure)

    try:
        for _ in range(rounds):
            ours_db, pgq_db = server.create_database(), server.create_database()
            note("one_ours", await ours_enqueue(ours_db, srv, n_one, batch=1))
            note(
                "one_pgq",
                await trio.to_thread.run_sync(functools.partial(pgq_enqueue, pgq_db, srv, n_one, batch=1)),
            )
            note("many_ours", await ours_enqueue(ours_db, srv, n_many, batch=1000))
            note("again_ours", await ours_enqueue(ours_db, srv, n_many // 5, batch=1000, again=True))
            note(
                "many_pgq",
                await trio.to_thread.run_sync(
                    functools.partial(pgq_enqueue, pgq_db, srv, n_many, batch=1000)
                ),
            )
            note("concurrent_ours", await ours_enqueue(ours_db, srv, n_one * 8, batch=1, callers=64))
            if with_procrastinate:
                pro_db = server.create_database()
                for key, n, batch in (("one_pro", n_one, 1), ("many_pro", n_many, 1000)):
                    enqueue = functools.partial(procrastinate_enqueue, pro_db, work, srv, n, batch=batch)
                    note(key, await trio.to_thread.run_sync(enqueue))
            for workers in (1, 2):
                note(
                    f"drain{workers}_ours",
                    await ours_drain(server.create_database(), srv, n_drain, workers, broker, work),
                )
                note(
                    f"drain{workers}_pgq",
                    await pgq_drain(server.create_database(), srv, n_drain, workers, work),
                )
        results: dict[str, Any] = {
            "rows": {"one": n_one, "many": n_many, "drain": n_drain},
            "rounds": rounds,
            "figures": {k: _median(v) for k, v in got.items()},
            "ratios": {
                "one": _ratio(got["one_ours"], got["one_pgq"]),
                "many": _ratio(got["many_ours"], got["many_pgq"]),
                "concurrent_to_one": _ratio(got["concurrent_ours"], got["one_ours"]),
                "again_to_many": _ratio(got["again_ours"], got["many_ours"]),
                "drain1": _ratio(got["drain1_ours"], got["drain1_pgq"]),
                "drain2": _ratio(got["drain2_ours"], got["drain2_pgq"]),
                "drain2_to_their_1": _ratio(got["drain2_ours"], got["drain1_pgq"]),
            },
            "per_round": {k: [f["rate"] for f in v] for k, v in got.items()},
            "targets": {"one": 1.0, "many": 1.0, "concurrent_to_one": 5.0, "drain1": 1.5, "drain2": 2.0},
        }
        results["claims"] = await claim_flatness(server, 100_000 if quick else 1_000_000)
        return results
    finally:
        server.destroy()


def peer_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    p = r["peers"]
    if "skipped" in p:
        return [("PostgreSQL against PgQueuer", "-", p["skipped"])]
    f, x, t = p["figures"], p["ratios"], p["targets"]

    def cell(key: str) -> str:
        return f"{f[key]['rate']:,.0f}" if key in f else "-"

    def cpu(key: str) -> str:
        return f"{f[key]['client_us']:.0f} / {f[key]['server_us']:.0f} µs" if key in f else ""

    rows = [
        ("PostgreSQL vs PgQueuer (medians of per-round ratios; CPU a row: client / server)", "", ""),
        (
            "  enqueue one at a time: trio-drain / PgQueuer (/s)",
            f"{cell('one_ours')} / {cell('one_pgq')}",
            f"{x['one']:.2f}x (target >= {t['one']}); {cpu('one_ours')} vs {cpu('one_pgq')}",
        ),
        (
            "  enqueue in batches of 1,000 (rows/s)",
            f"{cell('many_ours')} / {cell('many_pgq')}",
            f"{x['many']:.2f}x (target >= {t['many']}); {cpu('many_ours')} vs {cpu('many_pgq')}",
        ),
        (
            "  the same batches again, every id taken (rows/s)",
            cell("again_ours"),
            f"{x['again_to_many']:.2f}x a fresh batch; {cpu('again_ours')}",
        ),
        (
            "  accept, 64 concurrent callers (/s)",
            cell("concurrent_ours"),
            f"{x['concurrent_to_one']:.1f}x one caller (target >= {t['concurrent_to_one']}); {cpu('concurrent_ours')}",
        ),
        (
            "  drain, one process each, defaults (rows/s)",
            f"{cell('drain1_ours')} / {cell('drain1_pgq')}",
            f"{x['drain1']:.2f}x (target >= {t['drain1']}); {cpu('drain1_ours')} vs {cpu('drain1_pgq')}",
        ),
        (
            "  drain, two processes each (rows/s)",
            f"{cell('drain2_ours')} / {cell('drain2_pgq')}",
            f"{x['drain2']:.2f}x (target >= {t['drain2']}), {x['drain2_to_their_1']:.2f}x their one;"
            f" {cpu('drain2_ours')} vs {cpu('drain2_pgq')}",
        ),
    ]
    if "one_pro" in f:
        rows.append(
            (
                "  Procrastinate, for reference: enqueue one / in batches (/s)",
                f"{cell('one_pro')} / {cell('many_pro')}",
                f"{cpu('one_pro')}; {cpu('many_pro')}",
            )
        )
    c = p["claims"]
    rows.append(
        (
            f"  claim of 128, {c['small_rows']:,} vs {c['rows']:,} pending, never analyzed (ms)",
            f"{c['claim_ms_small']:.2f} / {c['claim_ms_large']:.2f}",
            f"{c['ratio']:.2f}x (target: flat); slowest of the first ten {c['slowest_of_first_ten_ms_large']:.1f} ms",
        )
    )
    return rows
