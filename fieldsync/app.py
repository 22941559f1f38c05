"""Wiring: settings -> storage backend, token verifier, replicator, endpoints -> one aiohttp
application."""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from prometheus_client import CollectorRegistry

from fieldsync import logs
from fieldsync.adapters import AdapterConfigError, AdapterContext, Adapters, DirectoryAdapter
from fieldsync.api import (
    AuditRoutes,
    AuthHelpers,
    ContractRoutes,
    DashboardRoutes,
    Downloads,
    MetricsEndpoint,
    Operations,
    OutboxRoutes,
    PrometheusObserver,
    ReferenceEndpoints,
    ScreenRoutes,
    ServerState,
    StateCollector,
    TeamRoutes,
    TusEndpoints,
    WorkOrderRoutes,
    install_middleware,
    load_spec,
)
from fieldsync.attachments import Attachments
from fieldsync.auth import (
    ClaimMapping,
    Policy,
    PolicyError,
    Principal,
    TeamSource,
    TokenVerifier,
    Verify,
    enriched,
    verify_with_directory,
)
from fieldsync.config import ConfigError, Settings, listen_address
from fieldsync.documents import Templates
from fieldsync.hints import RedisHints
from fieldsync.records import UNOBSERVED, Observer, Person
from fieldsync.replication import (
    Cluster,
    Endpoints,
    Follower,
    Limits,
    Replicator,
    ServiceWriter,
    V1Session,
    Views,
)
from fieldsync.storage import Backend, Leases, PostgresBackend, SQLiteBackend, Store

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
# The backend's document store: what the write path commits to (documents, feed, history…).
STORE = web.AppKey("store", Store)
REPLICATOR = web.AppKey("replicator", Replicator)
# Cluster mode only: the links to the other nodes and the handler of theirs.
CLUSTER = web.AppKey("cluster", Cluster)
ENDPOINTS = web.AppKey("endpoints", Endpoints)
# The dashboards' live views over `/v1/sync` (`subscribe`), fed by the write path's commits.
VIEWS = web.AppKey("views", Views)
# Cluster mode: follows the other nodes' commits through the change feed (None on SQLite).
FOLLOWER = web.AppKey("follower", Follower)
# Uploads, downloads, and `describe(doc)` / `unresolved_attachments(doc)` for screens.
ATTACHMENTS = web.AppKey("attachments", Attachments)
# Reference data: its routes, `store` (imports, changes, snapshots) and `compact_expired()`.
REFERENCE = web.AppKey("reference", ReferenceEndpoints)
# The configured adapters and their outbox runner (`FIELDSYNC_ADAPTERS`).
ADAPTERS = web.AppKey("adapters", Adapters)
# This application's Prometheus registry (its own: several apps in one process never collide).
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
# Where the separate metrics listener (`FIELDSYNC_METRICS_LISTEN`) is bound, once started.
METRICS_ADDRESS = web.AppKey("metrics_address", tuple)


class AccessLogger(AbstractAccessLogger):
    """Logs the path without its query string: a browser's y-websocket token travels there and
    must never reach a log."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.1fms',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time * 1000,
        )


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_frame=settings.max_frame,
        max_body=settings.max_body,
        max_doc_bytes=settings.max_doc_bytes,
        rate=settings.rate,
        burst=settings.burst,
        auth_timeout=settings.auth_timeout,
        changes_page=settings.changes_page,
        max_offline=settings.max_offline_days * 86_400,
        max_sockets_per_subject=settings.max_sockets_per_subject,
        max_queued=settings.max_queued,
        refusal_rate=settings.refusal_rate,
    )


def create_app(settings: Settings) -> web.Application:
    """The server. It verifies tokens against `settings.oidc_issuer` (started with the app).

    Resources start in the order added to `cleanup_ctx` and stop in reverse: the backend first
    and last, so everything else may use it for as long as it runs."""
    # aiohttp closes a connection whose next request head is not complete within its keep-alive
    # timeout, counted from the connection's opening or the previous answer: the bound on a
    # client that trickles its headers (slowloris). Set here, so that every runner has it.
    app = web.Application(
        client_max_size=settings.max_frame,
        handler_args={"keepalive_timeout": settings.header_timeout},
    )
    app[SETTINGS] = settings
    registry = app[METRICS_REGISTRY] = CollectorRegistry()
    observer = PrometheusObserver(registry)
    backend = backend_for(settings, observer)
    app[BACKEND], app[STORE] = backend, backend.store
    app.cleanup_ctx.append(_resource(backend.open, backend.close))
    verifier = _token_verifier(settings)
    app.cleanup_ctx.append(_resource(verifier.start, verifier.close))
    leases = _leases(settings, backend)
    replicator = app[REPLICATOR] = _replicator(settings, backend.store, observer, leases)
    if leases is not None:
        _add_cluster(app, settings, replicator, leases)  # listening before the leases name it
    app.cleanup_ctx.append(_resource(replicator.start, replicator.stop))
    # Built now (started later, with the other resources): the directory adapter, if any,
    # takes part in making principals; inbound adapters write through the replicator.
    adapters = app[ADAPTERS] = _load_adapters(app, settings, backend)
    verify = _principals(verifier, backend, adapters)
    install_middleware(app, settings, verify)
    views = _add_views(app, settings, backend, replicator)
    endpoints = _add_sync(app, settings, replicator, verify, views)
    _add_follower(app, settings, backend, replicator, views)
    _add_operations(app, backend.store, replicator, endpoints)
    _add_prometheus(app, settings, backend, endpoints, verifier)
    _add_auth_helpers(app, settings, verifier)
    attachments = _add_attachments(app, settings, backend, replicator)
    _add_screens(app, settings, backend, replicator, attachments)
    _add_reference(app, settings, backend, replicator)
    _add_adapters(app, backend, adapters)
    app.router.add_routes(
        TeamRoutes(backend.directory, lambda: replicator.policy, backend.screens).routes()
    )
    # The contract, read at start: a broken file stops the server rather than serve a lie.
    app.router.add_routes(ContractRoutes(load_spec()).routes())
    app.router.add_routes(DashboardRoutes().routes())
    return app


def backend_for(settings: Settings, observer: Observer = UNOBSERVED) -> Backend:
    """The storage backend the settings name (unopened): PostgreSQL when `database_url` names
    one (cluster mode), otherwise SQLite in the data directory."""
    settings.data_path.mkdir(parents=True, exist_ok=True)
    if settings.database_url:
        return PostgresBackend(
            settings.database_url,
            compact_after_updates=settings.compact_after,
            reference_chunk_rows=settings.reference_import_chunk,
            observer=observer,
        )
    return SQLiteBackend(
        settings.data_path / "fieldsync.db",
        compact_after_updates=settings.compact_after,
        reference_chunk_rows=settings.reference_import_chunk,
        observer=observer,
    )


def _resource(
    start: Callable[[], Awaitable[object]], stop: Callable[[], Awaitable[object]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` entry: `stop` runs only if `start` returned (aiohttp then stops the
    resources started before, in reverse)."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await start()
        yield
        await stop()

    return lifecycle


def _token_verifier(settings: Settings) -> TokenVerifier:
    return TokenVerifier(
        settings.oidc_issuer,
        settings.oidc_audience,
        ClaimMapping(
            roles=settings.roles_claim,
            team=settings.team_claim,
            region=settings.region_claim,
            name=settings.name_claim,
        ),
        leeway=settings.token_leeway,
    )


def _replicator(
    settings: Settings, store: Store, observer: Observer, leases: Leases | None
) -> Replicator:
    return Replicator(
        store,
        leases=leases,
        observer=observer,
        policy=load_policy(settings),
        templates=load_templates(settings),
        max_doc_bytes=settings.max_doc_bytes,
        idle_seconds=settings.idle_seconds,
        max_rooms=settings.max_rooms,
    )


def _leases(settings: Settings, backend: Backend) -> Leases | None:
    """This node's leases in cluster mode (a PostgreSQL backend), None on SQLite."""
    node = settings.node_id or f"node-{secrets.token_hex(4)}"
    leases = backend.leases(node, settings.node_url, settings.lease_ttl)
    if leases is not None and not settings.cluster_secret:
        raise ConfigError("cluster_secret", "required in cluster mode (database_url is set)")
    return leases


def _add_cluster(
    app: web.Application, settings: Settings, replicator: Replicator, leases: Leases
) -> None:
    """Cluster mode: the node-to-node listener (its own, so that it can stay off the public
    network) serving the other nodes' links, and this node's links to them. Its address is
    what the leases register for the others, unless `node_url` says otherwise."""
    cluster = app[CLUSTER] = Cluster(replicator, leases.node, settings.cluster_secret)
    listener = web.Application()
    listener.router.add_routes(cluster.routes())
    if settings.cluster_listen:
        host, port = listen_address(settings.cluster_listen)
    else:
        host, port = settings.host, 0

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(listener, access_log_class=AccessLogger)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            bound_host, bound_port = runner.addresses[0][:2]
            if not leases.url:
                if bound_host in ("0.0.0.0", "::"):
                    logging.getLogger(__name__).warning(
                        "the cluster listener is bound to every address: set FIELDSYNC_NODE_URL"
                        " to the one the other nodes reach this node at"
                    )
                name = f"[{bound_host}]" if ":" in bound_host else bound_host
                leases.url = f"http://{name}:{bound_port}"
            yield
        finally:
            await cluster.close()
            await runner.cleanup()

    app.cleanup_ctx.append(lifecycle)


def _add_views(
    app: web.Application, settings: Settings, backend: Backend, replicator: Replicator
) -> Views:
    def online() -> set[str]:
        connections = app[ENDPOINTS].connections
        return {c.device_id for c in connections if isinstance(c, V1Session) and c.device_id}

    views = app[VIEWS] = Views(
        backend.store,
        backend.screens,
        lambda: replicator.policy,  # read per change: SIGHUP may replace it
        min_versions=settings.min_client_versions,
        online=online,
        refresh=settings.views_refresh,
    )
    replicator.commit_hooks.append(views.committed)
    app.cleanup_ctx.append(_resource(views.start, views.stop))
    return views


def _add_follower(
    app: web.Application,
    settings: Settings,
    backend: Backend,
    replicator: Replicator,
    views: Views,
) -> None:
    """On PostgreSQL, other nodes may commit to the same database: their commits reach this
    node's sessions and views through the change feed, woken by Redis hints when configured."""
    if not settings.database_url:
        return
    hints = RedisHints(settings.redis_url, settings.redis_channel) if settings.redis_url else None
    follower = app[FOLLOWER] = Follower(
        backend.store, replicator, views, hints, poll=settings.feed_poll
    )
    app.cleanup_ctx.append(_resource(follower.start, follower.stop))


def _add_sync(
    app: web.Application,
    settings: Settings,
    replicator: Replicator,
    verify: Verify,
    views: Views,
) -> Endpoints:
    endpoints = app[ENDPOINTS] = Endpoints(
        replicator, verify, limits_from(settings), settings.min_client_versions, views
    )

    async def drain(app: web.Application) -> None:
        await endpoints.drain()

    # On shutdown, before any resource stops: devices hear 4503 (reconnect elsewhere) while
    # their last updates can still commit.
    app.on_shutdown.append(drain)
    app.router.add_get("/v1/sync", endpoints.sync)
    app.router.add_get("/v1/yws/{doc_id}", endpoints.yws)
    return endpoints


def _add_operations(
    app: web.Application, store: Store, replicator: Replicator, endpoints: Endpoints
) -> None:
    async def readiness() -> dict[str, object] | None:
        if endpoints.draining:
            return None
        return {"seq": await store.head(), "adapters": app[ADAPTERS].health()}

    async def metrics() -> dict[str, object]:
        return {
            "store": await store.stats(),
            "rooms_loaded": replicator.loaded,
            "connections": len(endpoints.connections),
            "adapters": await app[ADAPTERS].metrics(),
        }

    app.router.add_routes(Operations(readiness, metrics, endpoints.sessions).routes())


def _add_prometheus(
    app: web.Application,
    settings: Settings,
    backend: Backend,
    endpoints: Endpoints,
    verifier: TokenVerifier,
) -> None:
    """`/metrics` on the main listener (with the scrape token) and, when configured, alone on
    a listener of its own; both read the state below at scrape time."""

    async def state() -> ServerState:
        sessions: Counter[tuple[str, str]] = Counter()
        for conn in endpoints.connections:
            client = conn.client if isinstance(conn, V1Session) else ("y-websocket", "")
            sessions[client] += 1
        datasets = await backend.reference.datasets()
        outbox = await app[ADAPTERS].runner.metrics()
        return ServerState(
            sessions=sessions,
            rooms_loaded=app[REPLICATOR].loaded,
            store=await backend.store.stats(),
            outbox=outbox,
            reference=[(d.dataset, d.rows, d.seq) for d in datasets],
            jwks_fetches=dict(verifier.jwks_fetches),
            draining=endpoints.draining,
        )

    registry = app[METRICS_REGISTRY]
    collector = StateCollector(state)
    registry.register(collector)
    metrics = MetricsEndpoint(registry, collector, settings.metrics_token)
    app.router.add_routes(metrics.routes())
    if settings.metrics_listen:
        host, port = listen_address(settings.metrics_listen)
        listener = web.Application()
        listener.router.add_routes(metrics.open_route())

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            runner = web.AppRunner(listener, access_log_class=AccessLogger)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
                app[METRICS_ADDRESS] = tuple(runner.addresses[0][:2])
                yield
            finally:
                await runner.cleanup()

        app.cleanup_ctx.append(lifecycle)


def _add_auth_helpers(app: web.Application, settings: Settings, verifier: TokenVerifier) -> None:
    auth = AuthHelpers(
        verifier,
        client_id=settings.oidc_client_id,
        scopes=settings.oidc_scopes,
        public_url=settings.public_url,
        timeout=settings.oidc_timeout,
        rate=settings.token_rate,
        burst=settings.token_burst,
    )
    app.cleanup_ctx.append(auth.lifecycle)  # after the verifier's start: reads its discovery
    app.router.add_routes(auth.routes())


def _add_attachments(
    app: web.Application, settings: Settings, backend: Backend, replicator: Replicator
) -> Attachments:
    attachments = app[ATTACHMENTS] = Attachments(
        backend.store,
        backend.attachments,
        settings.data_path / "attachments",
        lambda: replicator.policy,  # read per request: SIGHUP may replace it
        max_bytes=settings.attachment_max_bytes,
        types=settings.attachment_types,
        max_pixels=settings.attachment_max_pixels,
        upload_expiry=settings.upload_expiry_hours * 3600,
        thumbnail_memory=settings.thumbnail_memory,
    )
    app.cleanup_ctx.append(attachments.lifecycle)
    app.router.add_routes(TusEndpoints(attachments, public_url=settings.public_url).routes())
    app.router.add_routes(Downloads(attachments).routes())
    return attachments


def _add_screens(
    app: web.Application,
    settings: Settings,
    backend: Backend,
    replicator: Replicator,
    attachments: Attachments,
) -> None:
    screens = ScreenRoutes(replicator, backend.screens, attachments.describe)
    app.router.add_routes(screens.routes())
    app.router.add_routes(WorkOrderRoutes(replicator, changes_page=settings.changes_page).routes())
    app.router.add_routes(AuditRoutes(replicator, backend.screens.cursor_key).routes())


def _add_reference(
    app: web.Application, settings: Settings, backend: Backend, replicator: Replicator
) -> None:
    reference = app[REFERENCE] = ReferenceEndpoints(
        backend.reference,
        lambda: replicator.policy,  # read per request: SIGHUP may replace it
        page=settings.reference_page,
        retention_days=settings.reference_retention_days,
    )
    app.cleanup_ctx.append(reference.lifecycle)  # compacts through the backend while it runs
    app.router.add_routes(reference.routes())


def _load_adapters(app: web.Application, settings: Settings, backend: Backend) -> Adapters:
    """The adapters file's adapters, built (a bad entry raises `AdapterConfigError` here, at
    start); a directory adapter's changes reach the open sessions."""

    async def directory_synced(people: Sequence[Person]) -> None:
        await _directory_synced(app, people)

    context = AdapterContext(
        settings.data_path,
        backend.outbox,
        backend.reference,
        writer=ServiceWriter(app[REPLICATOR]),
        directory=backend.directory,
        directory_synced=directory_synced,
        screens=backend.screens,
    )
    path = Path(settings.adapters) if settings.adapters else None
    adapters = Adapters.load(
        path, context, backend.store, retention_days=settings.outbox_retention_days
    )
    directories = [a for a in adapters.adapters if isinstance(a, DirectoryAdapter)]
    if len(directories) > 1:
        raise AdapterConfigError(directories[1].name, "kind", "one directory adapter at most")
    return adapters


def _directory_adapter(adapters: Adapters) -> DirectoryAdapter | None:
    return next((a for a in adapters.adapters if isinstance(a, DirectoryAdapter)), None)


def _principals(verifier: TokenVerifier, backend: Backend, adapters: Adapters) -> Verify:
    """How a token becomes a principal, for HTTP and the sockets alike: the verifier's, then
    the directory's step when a directory adapter is configured."""
    directory = _directory_adapter(adapters)
    if directory is None:
        return verifier.verify
    source = TeamSource(directory.team_source)
    return verify_with_directory(verifier.verify, backend.directory.person, source)


async def _directory_synced(app: web.Application, people: Sequence[Person]) -> None:
    """A directory sync was applied and the table holds `people`: the open sessions of the
    disabled and deleted are closed, those of people moved are rescoped."""
    directory = _directory_adapter(app[ADAPTERS])
    if directory is None:
        return
    source = TeamSource(directory.team_source)

    def update(person: Person) -> Callable[[Principal], Principal]:
        return lambda principal: enriched(principal, person, source)

    closed = await app[ENDPOINTS].reauthorise({p.subject: update(p) for p in people})
    if closed:
        logging.getLogger(__name__).info(
            "directory: closed %d session(s) of disabled or deleted accounts", closed
        )


def _add_adapters(app: web.Application, backend: Backend, adapters: Adapters) -> None:
    """The adapters, started after the backend and stopped before it; the operators' outbox
    routes."""
    app.cleanup_ctx.append(adapters.lifecycle)
    cursor_key = backend.screens.cursor_key
    app.router.add_routes(OutboxRoutes(backend.outbox, cursor_key, adapters.runner.wake).routes())


def load_policy(settings: Settings) -> Policy:
    return Policy.load(Path(settings.policy) if settings.policy else None)


def load_templates(settings: Settings) -> Templates:
    return Templates.load(Path(settings.form_templates) if settings.form_templates else None)


def reload_policy(app: web.Application) -> None:
    """SIGHUP: read the policy again; a broken file is reported and the running one kept."""
    try:
        app[REPLICATOR].policy = load_policy(app[SETTINGS])
    except PolicyError as exc:
        logging.getLogger(__name__).error("%s; keeping the running policy", exc)
        return
    logging.getLogger(__name__).info("policy reloaded from %s", app[REPLICATOR].policy.source)


def configure_logging(level: str, format: str = "text") -> None:
    logs.configure(level, format)
