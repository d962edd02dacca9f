"""The tutorial's program: a Trio application that accepts messages into an
outbox and delivers them to a broker through a drain worker.

Start a broker first, in another terminal::

    trio-drain broker serve --open --port 8765

then run::

    python hello_drain.py [BROKER_URL [OUTBOX_PATH]]

Every step is explained in docs/tutorial/index.rst, which shows this file
piece by piece. Tests may import it and call `main` with a broker of their
own.
"""

from __future__ import annotations

import sys

import trio

import trio_drain

MESSAGES = 3


# [accept]
async def accept_greetings(outbox: trio_drain.Outbox) -> list[str]:
    """Put a few messages in the outbox; return their client ids."""
    ids = []
    for n in range(MESSAGES):
        request = trio_drain.SendRequest(
            mesh="alpha",  # which broker connection: the one registered as "alpha"
            target_spec="*",  # everyone in the mesh
            payload=f"hello {n}".encode(),
            client_message_id=f"greeting-{n}",
        )
        outcome = await outbox.accept(request)
        print(f"accept {outcome.client_message_id}: {outcome.kind} {outcome.code}")
        ids.append(outcome.client_message_id)
    return ids


# [/accept]


# [wait]
async def wait_until_delivered(outbox: trio_drain.Outbox, client_message_id: str) -> trio_drain.OutboxRow:
    """Poll the outbox until the row is done (or dead), and return it."""
    while True:
        row = await outbox.get_by_client_id(client_message_id)
        assert row is not None
        if row.status in (trio_drain.Status.DONE, trio_drain.Status.DEAD):
            return row
        await trio.sleep(0.05)


# [/wait]


async def main(broker_url: str = "ws://127.0.0.1:8765/ws", outbox_path: str = "tutorial.db") -> None:
    # [open]
    async with (
        trio_drain.open_outbox(outbox_path) as outbox,
        trio.open_nursery() as nursery,
    ):
        # [/open]
        # [connect]
        # Who we are to the broker. A real deployment reads its key from a
        # file made by `trio-drain keygen`; the broker runs with --open, so
        # any correctly signed hello gets in, and a fresh key will do.
        identity = trio_drain.MeshIdentity(
            mesh_id="mesh-alpha",
            member_id="member-1",
            secret_key=trio_drain.generate_secret_key(),
        )
        broker = trio_drain.WebSocketBroker(broker_url, identity)
        await nursery.start(broker.run)  # first attempt made; reconnects forever
        print("broker connected:", broker.is_open())

        registry = trio_drain.BrokerRegistry()
        registry.set_mesh("alpha", broker)  # rows with mesh="alpha" go here
        # [/connect]

        # [worker]
        worker = trio_drain.DrainWorker(outbox, registry, trio_drain.DrainConfig())
        await nursery.start(worker.run)  # expired leases recovered; now draining
        # [/worker]

        # [deliver]
        ids = await accept_greetings(outbox)
        for client_message_id in ids:
            row = await wait_until_delivered(outbox, client_message_id)
            print(f"{row.client_message_id}: {row.status} as {row.broker_message_id}")
        # [/deliver]

        # [again]
        again = await outbox.accept(
            trio_drain.SendRequest(
                mesh="alpha", target_spec="*", payload=b"hello 0", client_message_id="greeting-0"
            )
        )
        print(f"accept greeting-0 again: {again.kind} {again.code} {again.broker_message_id}")

        changed = await outbox.accept(
            trio_drain.SendRequest(
                mesh="alpha", target_spec="*", payload=b"something else", client_message_id="greeting-0"
            )
        )
        print(f"accept greeting-0 with another payload: {changed.kind} {changed.code} {changed.reason}")
        # [/again]

        # [stop]
        stats = worker.statistics()
        print(f"worker: sent {stats.sent}, acked {stats.acked}, in flight {stats.in_flight}")
        print("outbox:", await outbox.counts())
        nursery.cancel_scope.cancel()  # stops the worker and the broker connection
        # [/stop]


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:])
