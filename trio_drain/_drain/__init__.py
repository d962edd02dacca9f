"""The drain worker: claims rows, sends them through the registry, records outcomes.

Its rooms: `_worker` (DrainWorker: the claim loop, run and stop), `_sending`
(route and send each row), `_outcomes` (map each answer to the row's
transition and settle it), `_gates` (each route's state: down, slow start,
paced), `_delivery` (the per-row record), `_completer` (outcomes written in
batches), `_window` (the policy that sizes the window of sends outstanding)
and `_statistics` (the counters and their frozen snapshots).
"""

from ._statistics import RouteStatistics as RouteStatistics
from ._statistics import WorkerStatistics as WorkerStatistics
from ._worker import DrainWorker as DrainWorker
