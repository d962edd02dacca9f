"""trio-drain: durable message delivery from a local outbox to brokers, for Trio.

async with trio_drain.open_outbox("outbox.db") as outbox:
    await outbox.accept(trio_drain.SendRequest(mesh="alpha", target_spec="*", payload=b"hi"))
"""

from ._accept_in import accept_in as accept_in
from ._brokers._identity import MeshIdentity as MeshIdentity
from ._brokers._identity import SessionIdentity as SessionIdentity
from ._brokers._identity import generate_secret_key as generate_secret_key
from ._brokers._registry import Broker as Broker
from ._brokers._registry import BrokerRegistry as BrokerRegistry
from ._brokers._registry import PipelinedBroker as PipelinedBroker
from ._brokers._registry import SendHandle as SendHandle
from ._brokers._statistics import WebSocketBrokerStatistics as WebSocketBrokerStatistics
from ._brokers._websocket import WebSocketBroker as WebSocketBroker
from ._brokers._wire import OutgoingMessage as OutgoingMessage
from ._brokers._wire import SendResult as SendResult
from ._config import DrainConfig as DrainConfig
from ._drain import DrainWorker as DrainWorker
from ._drain import RouteStatistics as RouteStatistics
from ._drain import WorkerStatistics as WorkerStatistics
from ._errors import AcceptConflict as AcceptConflict
from ._errors import BrokerError as BrokerError
from ._errors import BrokerUnavailable as BrokerUnavailable
from ._errors import ConfigError as ConfigError
from ._errors import CorruptDatabase as CorruptDatabase
from ._errors import HandshakeError as HandshakeError
from ._errors import InvalidRequest as InvalidRequest
from ._errors import InvalidTransition as InvalidTransition
from ._errors import SchemaError as SchemaError
from ._errors import StoreClosed as StoreClosed
from ._errors import StoreError as StoreError
from ._errors import StoreUnavailable as StoreUnavailable
from ._errors import TrioDrainError as TrioDrainError
from ._errors import UnknownRow as UnknownRow
from ._fingerprint import canonical_json as canonical_json
from ._fingerprint import request_fingerprint as request_fingerprint
from ._metrics import MetricsCollector as MetricsCollector
from ._model import AcceptOutcome as AcceptOutcome
from ._model import OutboxRow as OutboxRow
from ._model import OutcomeKind as OutcomeKind
from ._model import Priority as Priority
from ._model import SendRequest as SendRequest
from ._model import Status as Status
from ._outbox import Outbox as Outbox
from ._outbox import open_outbox as open_outbox
from ._reference_broker import BrokerServer as BrokerServer
from ._reference_broker import BrokerStatistics as BrokerStatistics
from ._reference_broker import Faults as Faults
from ._reference_broker import RateLimit as RateLimit
from ._reference_broker import serve_broker as serve_broker
from ._store._overview import DeadRow as DeadRow
from ._store._overview import Overview as Overview
from ._store._overview import RouteRows as RouteRows
from ._version import __version__ as __version__
