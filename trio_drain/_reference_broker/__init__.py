"""The reference broker: a small, strict broker for tests, demos and CI.

It serves the seed's wire protocol over WebSocket. It verifies both hello
kinds (signature, clock skew, attestation expiry, membership, `cwd`
present), enforces a payload limit, rate-limits each member when asked (a
token bucket: a burst, then so many a minute), dedupes on (meshId,
client_message_id) with fingerprint comparison, keeps what it accepted in
SQLite when given a file (so dedupe survives a restart), and can inject
faults: an ack delay (fixed, or on a schedule that changes it while it
runs), a capacity (more sends waiting on one connection are answered
``overloaded``), dropped acks, a transient error rate, and a disconnect
every N sends.

With ``compat="claudemesh"`` it answers like the seed's real broker, as
observed by running it: acks without `code`, `permanent` or `duplicate`,
its error texts, no dedupe (a resend is accepted again under a new message
id), the size limit on ciphertext + nonce + target, silence on a hello
without `cwd` (its presence insert fails and it never answers) and on a
send frame it cannot handle (no `targetSpec`, a priority outside the
three: its handler throws and nothing is sent back).

The rooms: `_server` (serving, `BrokerServer`, the members file),
`_handler` (one connection: hello exchange, each send decided and acked),
`_hello` (judging a hello), `_acks` (ack frames, their encoding, the ack
queue), `_ledger` (what was accepted, durably), `_limits` (limits and
injected faults), `_statistics` (the counters and their snapshot).

Other packages and the tests import from here, never from the modules inside.
"""

from ._acks import encode_ack as encode_ack
from ._handler import Compat as Compat
from ._limits import CLAUDEMESH_MAX_MESSAGE_BYTES as CLAUDEMESH_MAX_MESSAGE_BYTES
from ._limits import DEFAULT_MAX_PAYLOAD as DEFAULT_MAX_PAYLOAD
from ._limits import AckDelaySchedule as AckDelaySchedule
from ._limits import Faults as Faults
from ._limits import RateLimit as RateLimit
from ._server import BrokerServer as BrokerServer
from ._server import load_members as load_members
from ._server import serve_broker as serve_broker
from ._statistics import BrokerStatistics as BrokerStatistics
