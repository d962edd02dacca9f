"""Measuring a drain: the Prometheus collector, what the worker tells it,
the paced reads of the outbox that it and ``trio-drain top`` share, and
the ``/metrics`` endpoint of ``trio-drain run --metrics``.

Its rooms: `_collector` (MetricsCollector, reading a snapshot), `_observer`
(histograms the worker feeds on its hot path), `_sampler` (overview reads
paced by their cost) and `_server` (the HTTP endpoint).
"""

from ._collector import MetricsCollector as MetricsCollector
