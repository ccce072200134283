"""The chat app's Prometheus metrics, for ``GET /metrics``: its own counters and their
collector, the names it gives the manager's, and the exposition's integral values.

The manager's metrics come from `ManagerCollector`; what is
here is the chat app's (messages, error frames by code, refusals by reason, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wsbroadcast import ConnectionManager

from .edge import ERROR_CODES, REFUSALS

_METRIC_NAMES: Final = {
    "published": "chat_envelopes_published_total",
    "delivered": "chat_deliveries_total",
    "dropped": "chat_drops_total",
    "backend_up": "chat_backend_connected",
}
"""The `ManagerCollector`'s names that are not ``chat_`` + its
key (``chat_connections``, ``chat_backend_reconnects_total``, ...)."""
_FLOAT_VALUE: Final = re.compile(rb"^([^#\n][^\n]* )([0-9.e+]+)$", re.MULTILINE)
"""A sample line's value as ``generate_latest`` writes it: always a float."""


def _integral(exposition: bytes) -> bytes:
    """``exposition`` with whole values as integers (``3`` for ``3.0``, ``1234567`` for
    ``1.234567e+06``): counts, as ``/metrics`` has always written them (the garbage
    collector's seconds keep their fractions)."""

    def integer(match: re.Match[bytes]) -> bytes:
        value = float(match[2])
        return match[1] + str(int(value)).encode() if value.is_integer() else match[0]

    return _FLOAT_VALUE.sub(integer, exposition)


@dataclass
class _Counters:
    messages: int = 0
    close_aborts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)


class _Counted(Protocol):
    """What `_ChatCollector` reads of a `ChatService`
    (a protocol, so that this module need not import that one)."""

    counters: _Counters
    manager: ConnectionManager | None
    write_buffer_overflows: Callable[[], int]


class _ChatCollector:
    """The chat app's own counters, for ``/metrics`` (the manager's come from
    `ManagerCollector`, registered while it runs)."""

    def __init__(self, service: _Counted) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        counters = service.counters
        yield GaugeMetricFamily(
            "chat_up", "1 while the manager runs.", value=int(service.manager is not None)
        )
        yield CounterMetricFamily(
            "chat_close_aborts_total",
            "Connections dropped because their close frame could not be written in time (a"
            " client that stopped reading).",
            value=counters.close_aborts,
        )
        yield CounterMetricFamily(
            "chat_write_buffer_overflows_total",
            "Connections closed with 4008 because their socket's write buffer (pongs included)"
            " passed --max-write-buffer.",
            value=service.write_buffer_overflows(),
        )
        yield CounterMetricFamily(
            "chat_messages_published_total",
            "Chat messages accepted and broadcast.",
            value=counters.messages,
        )
        errors = CounterMetricFamily(
            "chat_errors_total", "Error frames sent to clients, by code.", labels=["code"]
        )
        for code in ERROR_CODES:
            errors.add_metric([code], counters.errors[code])
        yield errors
        refused = CounterMetricFamily(
            "chat_connections_refused_total",
            "Handshakes refused, and connections closed for breaking a rule, by reason.",
            labels=["reason"],
        )
        for reason in REFUSALS:
            refused.add_metric([reason], counters.refused[reason])
        yield refused
