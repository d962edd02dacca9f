"""The WebSocket layer: an RFC 6455 codec, the connection engine over a Trio stream, clients and a server.

Other packages import from here, never from the modules inside.
"""

from ._transport import TRANSPORTS as TRANSPORTS
from ._transport import Connection as Connection
from ._transport import ServerConnection as ServerConnection
from ._transport import TransportClosed as TransportClosed
from ._transport import TransportName as TransportName
from ._transport import TransportRejected as TransportRejected
from ._transport import open_connection as open_connection
from ._transport import serve_websocket as serve_websocket
