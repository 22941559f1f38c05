"""Wiring: settings -> store, token verifier, replicator, endpoints -> one aiohttp application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from fieldsync.adapters import AdapterContext, Adapters
from fieldsync.api import (
    Attachments,
    AuditRoutes,
    AuthHelpers,
    ContractRoutes,
    Downloads,
    Operations,
    OutboxRoutes,
    ReferenceEndpoints,
    ScreenRoutes,
    TusEndpoints,
    WorkOrderRoutes,
    install_middleware,
    load_spec,
)
from fieldsync.auth import ClaimMapping, Policy, PolicyError, Principal, TokenVerifier
from fieldsync.config import Settings
from fieldsync.documents import Templates
from fieldsync.replication import Endpoints, Limits, Replicator, ServiceWriter
from fieldsync.storage import (
    Blobs,
    ReferenceData,
    ReferenceStore,
    SQLiteOutbox,
    SQLiteScreens,
    SQLiteStore,
    Store,
    Tables,
)

STORE = web.AppKey("store", Store)
REPLICATOR = web.AppKey("replicator", Replicator)
ENDPOINTS = web.AppKey("endpoints", Endpoints)
SETTINGS = web.AppKey("settings", Settings)
# Uploads, downloads, and `describe(doc)` / `unresolved_attachments(doc)` for screens.
ATTACHMENTS = web.AppKey("attachments", Attachments)
# Reference data: its routes, `store` (imports, changes, snapshots) and `compact_expired()`.
REFERENCE = web.AppKey("reference", ReferenceEndpoints)
# The configured adapters and their outbox runner (`FIELDSYNC_ADAPTERS`).
ADAPTERS = web.AppKey("adapters", Adapters)

Verify = Callable[[str], Awaitable[Principal]]


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
    )


def create_app(settings: Settings, *, store: Store | None = None) -> web.Application:
    """The server. It verifies tokens against `settings.oidc_issuer` (started with the app)."""
    app = web.Application(client_max_size=settings.max_frame)
    app[SETTINGS] = settings
    settings.data_path.mkdir(parents=True, exist_ok=True)
    the_store: Store = store or SQLiteStore(
        settings.data_path / "fieldsync.db", compact_after_updates=settings.compact_after
    )
    app[STORE] = the_store
    replicator = Replicator(
        the_store,
        policy=load_policy(settings),
        templates=load_templates(settings),
        max_doc_bytes=settings.max_doc_bytes,
        idle_seconds=settings.idle_seconds,
        max_rooms=settings.max_rooms,
    )
    app[REPLICATOR] = replicator
    verifier = TokenVerifier(
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
    install_middleware(app, settings, verifier.verify)
    endpoints = Endpoints(
        replicator, verifier.verify, limits_from(settings), settings.min_client_versions
    )
    app[ENDPOINTS] = endpoints

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await the_store.open()
        await verifier.start()
        await replicator.start()
        yield
        await endpoints.drain()
        await replicator.stop()
        await verifier.close()
        await the_store.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(lambda _app: endpoints.drain())
    app.router.add_get("/v1/sync", endpoints.sync)
    app.router.add_get("/v1/yws/{doc_id}", endpoints.yws)

    async def readiness() -> dict[str, object] | None:
        if endpoints.draining:
            return None
        return {"seq": await the_store.head(), "adapters": app[ADAPTERS].health()}

    async def metrics() -> dict[str, object]:
        return {
            "store": await the_store.stats(),
            "rooms_loaded": replicator.loaded,
            "connections": len(endpoints.connections),
            "adapters": await app[ADAPTERS].metrics(),
        }

    app.router.add_routes(Operations(readiness, metrics).routes())
    auth = AuthHelpers(
        verifier,
        client_id=settings.oidc_client_id,
        scopes=settings.oidc_scopes,
        public_url=settings.public_url,
        timeout=settings.oidc_timeout,
        rate=settings.token_rate,
        burst=settings.token_burst,
    )
    app.cleanup_ctx.append(auth.lifecycle)  # after `lifecycle`: needs the verifier started
    app.router.add_routes(auth.routes())
    if not isinstance(the_store, Tables):
        raise TypeError("attachments need a store with tables of its own (transact, query)")
    attachments = Attachments(
        the_store,
        the_store,
        Blobs(settings.data_path / "attachments"),
        lambda: replicator.policy,  # read per request: SIGHUP may replace it
        max_bytes=settings.attachment_max_bytes,
        types=settings.attachment_types,
        max_pixels=settings.attachment_max_pixels,
        upload_expiry=settings.upload_expiry_hours * 3600,
    )
    app[ATTACHMENTS] = attachments
    app.cleanup_ctx.append(attachments.lifecycle)
    app.router.add_routes(TusEndpoints(attachments, public_url=settings.public_url).routes())
    app.router.add_routes(Downloads(attachments).routes())
    if not isinstance(the_store, SQLiteStore):
        raise TypeError("the screens' queries exist for the SQLite store only (storage._screens)")
    screens = SQLiteScreens(the_store)
    app.router.add_routes(ScreenRoutes(replicator, screens, attachments.describe).routes())
    app.router.add_routes(WorkOrderRoutes(replicator, changes_page=settings.changes_page).routes())
    app.router.add_routes(AuditRoutes(replicator, screens.cursor_key).routes())
    reference = ReferenceEndpoints(
        ReferenceData(the_store, chunk_rows=settings.reference_import_chunk),
        lambda: replicator.policy,  # read per request: SIGHUP may replace it
        page=settings.reference_page,
        retention_days=settings.reference_retention_days,
    )
    app[REFERENCE] = reference
    app.cleanup_ctx.append(reference.lifecycle)  # after `lifecycle`: compacts through the store
    app.router.add_routes(reference.routes())
    add_adapters(app, settings, SQLiteOutbox(the_store), reference.store, screens.cursor_key)
    # The contract, read at start: a broken file stops the server rather than serve a lie.
    app.router.add_routes(ContractRoutes(load_spec()).routes())
    return app


def add_adapters(
    app: web.Application,
    settings: Settings,
    outbox: SQLiteOutbox,
    reference: ReferenceStore,
    cursor_key: Callable[[], Awaitable[bytes]],
) -> None:
    """The adapters file's adapters (a bad entry raises `AdapterConfigError` here, at start),
    started after the store and stopped before it; the operators' outbox routes."""
    # Inbound kinds write documents through the device write path, as service principals.
    context = AdapterContext(
        settings.data_path, outbox, reference, writer=ServiceWriter(app[REPLICATOR])
    )
    path = Path(settings.adapters) if settings.adapters else None
    adapters = Adapters.load(
        path, context, app[STORE], retention_days=settings.outbox_retention_days
    )
    app[ADAPTERS] = adapters
    app.cleanup_ctx.append(adapters.lifecycle)
    app.router.add_routes(OutboxRoutes(outbox, cursor_key, adapters.runner.wake).routes())


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


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
