"""The tutorial's second program: an application that writes its own rows
and the messages announcing them in one transaction, with `accept_in`.

Start a broker first, in another terminal::

    trio-drain broker serve --open --port 8765

then run::

    python orders.py [BROKER_URL [DATABASE_PATH]]

Every step is explained in docs/tutorial/transaction.rst, which shows this
file piece by piece. Tests may import it and call `main` with a broker of
their own.
"""

from __future__ import annotations

import sqlite3
import sys

import trio

import trio_drain


# [schema]
def create_orders_table(path: str) -> None:
    """The application's own table, in the outbox's database file."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, item TEXT NOT NULL)")
    conn.close()


# [/schema]


# [place]
def place_order(path: str, order_id: str, item: str) -> trio_drain.AcceptOutcome:
    """Record an order and the message announcing it: both or neither."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway
        try:
            conn.execute("INSERT INTO orders (id, item) VALUES (?, ?)", (order_id, item))
            outcome = trio_drain.accept_in(
                conn,
                trio_drain.SendRequest(
                    mesh="alpha",
                    target_spec="*",
                    payload=f"order {order_id}: {item}".encode(),
                    client_message_id=f"order-placed-{order_id}",
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return outcome


# [/place]


# [fail]
def place_order_that_fails(path: str, order_id: str) -> None:
    """An order whose transaction fails after accept_in: no order, no message."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        trio_drain.accept_in(
            conn,
            trio_drain.SendRequest(
                mesh="alpha",
                target_spec="*",
                payload=b"never sent",
                client_message_id=f"order-placed-{order_id}",
            ),
        )
        conn.execute("INSERT INTO orders (id, item) VALUES (?, NULL)", (order_id,))  # NOT NULL: fails
        conn.execute("COMMIT")
    except sqlite3.IntegrityError as exc:
        conn.execute("ROLLBACK")
        print(f"order {order_id} failed ({exc}): rolled back, message and all")
    finally:
        conn.close()


# [/fail]


async def wait_until_done(outbox: trio_drain.Outbox, client_message_id: str) -> trio_drain.OutboxRow:
    """Poll the outbox until the row is done, and return it."""
    while True:
        row = await outbox.get_by_client_id(client_message_id)
        if row is not None and row.status is trio_drain.Status.DONE:
            return row
        await trio.sleep(0.05)


async def main(broker_url: str = "ws://127.0.0.1:8765/ws", path: str = "shop.db") -> None:
    # [open]
    async with trio_drain.open_outbox(path) as outbox, trio.open_nursery() as nursery:
        await trio.to_thread.run_sync(create_orders_table, path)
        identity = trio_drain.MeshIdentity(
            mesh_id="mesh-alpha", member_id="member-1", secret_key=trio_drain.generate_secret_key()
        )
        broker = trio_drain.WebSocketBroker(broker_url, identity)
        await nursery.start(broker.run)
        registry = trio_drain.BrokerRegistry()
        registry.set_mesh("alpha", broker)
        worker = trio_drain.DrainWorker(outbox, registry, trio_drain.DrainConfig())
        await nursery.start(worker.run)
        # [/open]

        # [orders]
        # sqlite3 blocks: the application's transactions run in a thread.
        outcome = await trio.to_thread.run_sync(place_order, path, "1001", "a teapot")
        print(f"order 1001 placed; its message: {outcome.kind} {outcome.code}")
        await trio.to_thread.run_sync(place_order_that_fails, path, "1002")
        # [/orders]

        # [delivered]
        row = await wait_until_done(outbox, "order-placed-1001")
        print(f"order-placed-1001: {row.status} as {row.broker_message_id}")
        print("order-placed-1002 in the outbox:", await outbox.get_by_client_id("order-placed-1002"))
        # [/delivered]
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:])
