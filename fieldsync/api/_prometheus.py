"""`/metrics` in Prometheus's text format, beside the JSON of `/v1/metrics`.

Every application has its own `CollectorRegistry` (several servers in one test process must not
share counters). What already exists as state (sessions, loaded documents, the store's counts,
the outbox, reference datasets, JWKS fetches) is read at scrape time by `StateCollector`; the
few figures that exist nowhere else (commit and ack latencies, group-commit sizes, rule
corrections, refusals) are observed by `PrometheusObserver`, which the write path calls through
the `records.Observer` seam. Every family is named `fieldsync_…`.
"""

from __future__ import annotations

import hmac
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from fieldsync.api._problems import problem
from fieldsync.auth import bearer_token
from fieldsync.errors import ErrorCode

__all__ = ["MetricsEndpoint", "PrometheusObserver", "ServerState", "StateCollector"]

# Seconds: a group commit with its fsync is a few ms on these machines, an ack under load tens.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True, slots=True)
class ServerState:
    """What the server holds at one moment, read once per scrape (see `fieldsync.app`)."""

    sessions: Tally[tuple[str, str]]  # (platform, app version) -> open sessions
    rooms_loaded: int
    store: Mapping[str, int]  # docs, devices, head, commits… (`Store.stats`)
    outbox: Mapping[str, Mapping[str, Any]]  # adapter -> pending, dead, lag_seconds, counters
    reference: Sequence[tuple[str, int, int]]  # (dataset, rows, seq of its last change)
    jwks_fetches: Mapping[str, int]  # outcome -> fetches
    draining: bool
    extra: Mapping[str, float] = field(default_factory=dict)


class StateCollector(Collector):
    """Families built from the last `refresh()`: the handler refreshes (async: the store is read
    on its threads), then the registry collects (sync)."""

    def __init__(self, read: Callable[[], Awaitable[ServerState]]) -> None:
        self._read = read
        self._state: ServerState | None = None

    async def refresh(self) -> None:
        self._state = await self._read()

    def collect(self) -> Iterator[Metric]:
        state = self._state
        if state is None:
            return
        sessions = GaugeMetricFamily(
            "fieldsync_sessions",
            "Open replication sessions, by the app's platform and version",
            labels=["platform", "version"],
        )
        for (platform, version), count in sorted(state.sessions.items()):
            sessions.add_metric([platform, version], count)
        yield sessions
        yield GaugeMetricFamily(
            "fieldsync_documents_loaded", "Documents held in memory", value=state.rooms_loaded
        )
        yield GaugeMetricFamily(
            "fieldsync_documents", "Documents stored", value=state.store.get("docs", 0)
        )
        yield GaugeMetricFamily(
            "fieldsync_devices", "Devices ever seen", value=state.store.get("devices", 0)
        )
        # The change sequence numbers every stored update: its rate is the updates per second.
        yield CounterMetricFamily(
            "fieldsync_updates",
            "Updates stored (devices, rules, adapters): the global change sequence",
            value=state.store.get("head", 0),
        )
        yield CounterMetricFamily(
            "fieldsync_group_commits",
            "Group commits by this process",
            value=state.store.get("commits", 0),
        )
        yield GaugeMetricFamily(
            "fieldsync_draining", "1 while the server drains for shutdown", value=state.draining
        )
        jwks = CounterMetricFamily(
            "fieldsync_jwks_fetches",
            "Fetches of the identity provider's signing keys, by outcome",
            labels=["outcome"],
        )
        for outcome, count in sorted(state.jwks_fetches.items()):
            jwks.add_metric([outcome], count)
        yield jwks
        yield from _outbox_families(state.outbox)
        rows = GaugeMetricFamily(
            "fieldsync_reference_rows", "Rows of each reference dataset", labels=["dataset"]
        )
        last = GaugeMetricFamily(
            "fieldsync_reference_seq",
            "Change seq of each reference dataset's last import change",
            labels=["dataset"],
        )
        for dataset, count, seq in state.reference:
            rows.add_metric([dataset], count)
            last.add_metric([dataset], seq)
        yield rows
        yield last


def _outbox_families(outbox: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    gauges = {
        "pending": ("fieldsync_outbox_pending", "Outbox entries waiting for delivery"),
        "lag_seconds": ("fieldsync_outbox_lag_seconds", "Age of the oldest pending entry"),
        "dead": ("fieldsync_outbox_dead_letters", "Dead-lettered entries awaiting an operator"),
    }
    counters = {
        "delivered": ("fieldsync_outbox_delivered", "Deliveries by this process"),
        "failures": ("fieldsync_outbox_failures", "Failed delivery attempts by this process"),
    }
    for key, (name, help_text) in gauges.items():
        family = GaugeMetricFamily(name, help_text, labels=["adapter"])
        for adapter, figures in sorted(outbox.items()):
            family.add_metric([adapter], figures.get(key, 0))
        yield family
    for key, (name, help_text) in counters.items():
        counter = CounterMetricFamily(name, help_text, labels=["adapter"])
        for adapter, figures in sorted(outbox.items()):
            counter.add_metric([adapter], figures.get(key, 0))
        yield counter


class PrometheusObserver:
    """The write path's `records.Observer`: histograms and counters on `registry`.
    prometheus-client's metrics are thread-safe (the storage writer's thread observes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._commit_seconds = Histogram(
            "fieldsync_commit_seconds",
            "Duration of a group commit, BEGIN to COMMIT with its fsync",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._commit_writes = Histogram(
            "fieldsync_group_commit_writes",
            "Writes per group commit",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self._ack_seconds = Histogram(
            "fieldsync_ack_seconds",
            "From a device's update received to its durable commit (its ack)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._corrections = Counter(
            "fieldsync_rule_corrections",
            "Corrections the domain rules made, by rule",
            ["rule"],
            registry=registry,
        )
        self._refused = Counter(
            "fieldsync_updates_refused",
            "Device messages on a document refused, by error code",
            ["code"],
            registry=registry,
        )

    def committed(self, writes: int, seconds: float) -> None:
        self._commit_seconds.observe(seconds)
        self._commit_writes.observe(writes)

    def acknowledged(self, seconds: float) -> None:
        self._ack_seconds.observe(seconds)

    def refused(self, code: str) -> None:
        self._refused.labels(code).inc()

    def corrected(self, rule: str) -> None:
        self._corrections.labels(rule).inc()


class MetricsEndpoint:
    """`GET /metrics`. On the main listener it needs `Authorization: Bearer <metrics token>`
    (none configured: nobody gets in there); on the separate metrics listener, where only the
    scraper's network reaches, `open_route()` needs nothing."""

    def __init__(self, registry: CollectorRegistry, state: StateCollector, token: str) -> None:
        self._registry = registry
        self._state = state
        self._token = token.encode()

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self.guarded)]

    def open_route(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self.scrape)]

    async def guarded(self, request: web.Request) -> web.StreamResponse:
        given = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
        if given is None:
            return problem(ErrorCode.REAUTHENTICATE, "the metrics token is required")
        # Constant time: the comparison must not tell a guesser how much of it was right.
        if not self._token or not hmac.compare_digest(given.encode(), self._token):
            return problem(ErrorCode.REAUTHENTICATE, "not the metrics token")
        return await self.scrape(request)

    async def scrape(self, request: web.Request) -> web.StreamResponse:
        await self._state.refresh()
        body = generate_latest(self._registry)
        response = web.Response(body=body)
        response.headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE_LATEST
        return response
