"""The WebSocket layer: an RFC 6455 codec, the connection engine over a Trio stream, clients and a server.

Other packages import from here, never from the modules inside, which are:

- `_connection`: the seam a broker uses (`Connection`), the transports'
  names and the two errors every transport fails with.
- `_handshake` and `_codec`: RFC 6455's opening handshake and framing, pure.
- `_engine`: one WebSocket over a Trio stream, I/O and closing handshake.
- `_client`, `_server`: dialling a URL, and accepting upgrades.
- `_wsproto`, `_trio_websocket`: the two other transports' adapters.
"""

from ._client import open_connection as open_connection
from ._connection import TRANSPORTS as TRANSPORTS
from ._connection import Connection as Connection
from ._connection import TransportClosed as TransportClosed
from ._connection import TransportName as TransportName
from ._connection import TransportRejected as TransportRejected
from ._server import ServerConnection as ServerConnection
from ._server import serve_websocket as serve_websocket
