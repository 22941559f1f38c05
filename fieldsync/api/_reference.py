"""Reference data over HTTP (DESIGN.md §2, §5): adapters import datasets, devices download what
changed since their last sync, or a snapshot when that history is gone.

- `PUT /v1/reference/{dataset}` (a full import: rows absent are deleted) and `PATCH` (a partial
  one: only the rows given), admins only, JSON lines. The storage computes field-level
  differences and records only real changes.
- `GET /v1/reference/{dataset}/changes?since=N&limit=…`: the changed fields of changed rows and
  the keys of deleted rows after N, paged, with the `next` since. A `since` older than the
  retention horizon is 410 `resync_required`, naming the snapshot.
- `GET /v1/reference/{dataset}/snapshot`: every row as JSON lines after a header line holding the
  `seq` it is consistent at, compressed as the client accepts.

Devices read only the datasets the policy gives their role (`Policy.datasets`); any other name,
existing or not, is 403 `forbidden`, so dataset names cannot be probed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import brotli
import orjson
import zstandard
from aiohttp import StreamReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from fieldsync.api._http import choose_coding, etag_matches, json_response, rest
from fieldsync.api._paging import page_size
from fieldsync.api._permissions import PRINCIPAL
from fieldsync.auth import Policy
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.periodic import Periodic
from fieldsync.storage import (
    ImportResult,
    InvalidRow,
    ReferencePage,
    ReferenceStore,
    ResyncRequired,
    RowChange,
    SnapshotHead,
)

__all__ = ["ReferenceEndpoints"]

log = logging.getLogger(__name__)

REFERENCE = "/v1/reference/{dataset}"
NDJSON = "application/x-ndjson"
# Both names are in use for JSON lines; adapters send either.
_NDJSON_TYPES = frozenset({NDJSON, "application/jsonl"})
_DATASET = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_KEY_FIELD = re.compile(r"[^\x00-\x1f]{1,64}")
# A row is a record of an asset or a part: a few hundred bytes. The bound keeps one line from
# holding a megabyte of the server's memory while it looks for the newline.
_MAX_ROW_BYTES = 64 * 1024
# The snapshot goes out in slices of this size, so the write buffer stays small whatever the
# dataset's size and a slow device applies back-pressure slice by slice.
_SLICE = 64 * 1024
# Rows serialised per compressor call while building a snapshot: fewer, larger calls.
_BUILD_BATCH = 1000
# Imports log their progress every this many rows.
_LOG_EVERY = 100_000
# Compaction runs at start and then this often: the retention is counted in days, so an hour
# late is nothing, and each run is cheap when nothing expired.
_COMPACT_EVERY = 3600.0


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Brotli:
    def __init__(self) -> None:
        self._compressor = brotli.Compressor(quality=5)

    def compress(self, data: bytes) -> bytes:
        return bytes(self._compressor.process(data))

    def flush(self) -> bytes:
        return bytes(self._compressor.finish())


def _streaming(coding: str) -> _Compressor:
    """A streaming compressor for one of `_http.CODINGS`: a snapshot is compressed as it is read,
    never held uncompressed."""
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        # Level 3 keeps the window at 2 MiB, within the 8 MB an HTTP zstd decoder must accept
        # (RFC 9659 §3). A streamed frame carries no content size: decode it as a stream.
        stream: _Compressor = zstandard.ZstdCompressor(level=3).compressobj()
        return stream
    if coding == "gzip":
        return zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    raise ValueError(coding)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A snapshot built for one content coding: `changed` is the dataset's last change it
    contains (it stays valid until the dataset changes again), `size` its length uncompressed."""

    changed: int
    seq: int
    rows: int
    size: int
    body: bytes


class ReferenceEndpoints:
    """The routes, and the compaction that keeps the change log within `retention_days`. Add
    `lifecycle` to the application's `cleanup_ctx` after the store opens."""

    def __init__(
        self,
        reference: ReferenceStore,
        policy: Callable[[], Policy],
        *,
        page: int,
        retention_days: float,
    ) -> None:
        self.store = reference
        self._policy = policy
        self._page = page
        self._retention = retention_days * 86400.0
        # The latest snapshot of each (dataset, coding): a resync wave after a compaction, or
        # the first day of a rollout, has every device download the same bytes, built once.
        self._snapshots: dict[tuple[str, str], _Snapshot] = {}
        self._building: dict[tuple[str, str], asyncio.Lock] = {}
        self._horizons: dict[str, int] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.put(REFERENCE, rest(self.replace)),
            web.patch(REFERENCE, rest(self.update)),
            web.get(REFERENCE + "/changes", rest(self.changes)),
            web.get(REFERENCE + "/snapshot", rest(self.snapshot)),
        ]

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        # At start too: a server that was down past the retention compacts at once.
        async with Periodic(
            "reference-compaction", _COMPACT_EVERY, self.compact_expired, at_start=True
        ):
            yield

    async def compact_expired(self) -> dict[str, int]:
        """Compact the change history older than the retention; each dataset's horizon."""
        horizons = await self.store.compact(time.time() - self._retention)
        moved = {d: h for d, h in horizons.items() if h != self._horizons.get(d)}
        if moved:
            log.info("reference data history compacted up to %s", moved)
        self._horizons = horizons
        return horizons

    # Adapters

    async def replace(self, request: web.Request) -> web.StreamResponse:
        """A full import: the body is the whole dataset, one JSON object per line; rows it does
        not contain are deleted (only once the body has been read to its end)."""
        return await self._import(request, full=True)

    async def update(self, request: web.Request) -> web.StreamResponse:
        """A partial import: the rows given, each whole, are created or updated; others stay."""
        return await self._import(request, full=False)

    async def _import(self, request: web.Request, *, full: bool) -> web.StreamResponse:
        dataset = request.match_info["dataset"]
        if not _DATASET.fullmatch(dataset):
            raise FieldsyncError(
                ErrorCode.INVALID_REQUEST,
                "a dataset name is 1-64 of a-z, 0-9, '_', '.', '-', from a letter or digit",
            )
        key = request.query.get("key", "id")
        if not _KEY_FIELD.fullmatch(key):
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, "key must name the rows' key field")
        if request.content_type not in _NDJSON_TYPES:
            raise FieldsyncError(
                ErrorCode.INVALID_REQUEST, f"send the rows as {NDJSON}: one JSON object per line"
            )
        subject = request[PRINCIPAL].subject
        applied = ImportResult(dataset, full)
        logged = 0

        def progress(result: ImportResult) -> None:
            nonlocal applied, logged
            applied = result
            if result.rows - logged >= _LOG_EVERY:
                logged = result.rows
                log.info("importing %s for %s: %d rows so far", dataset, subject, result.rows)

        try:
            result = await self.store.import_rows(
                dataset, _json_lines(request.content), key=key, full=full, progress=progress
            )
        except (ConnectionError, HttpProcessingError) as exc:
            # The upload broke off (the adapter's link, a truncated body): what was committed
            # stays, a full import deleted nothing, and nobody is left to read an answer.
            log.warning(
                "import into %s by %s cut off after %d rows: %r",
                dataset,
                subject,
                applied.rows,
                exc,
            )
            raise FieldsyncError(
                ErrorCode.INVALID_REQUEST, "the request body ended early", applied=asdict(applied)
            ) from None
        except InvalidRow as exc:
            # The chunks before the bad row are committed: the adapter learns how far it got,
            # and importing the corrected data again records only what still differs.
            log.warning("import into %s by %s stopped: %s", dataset, subject, exc)
            raise FieldsyncError(
                ErrorCode.INVALID_REQUEST, str(exc), applied=asdict(applied)
            ) from None
        log.info(
            "%s import into %s by %s: %d rows, %d created, %d updated, %d deleted",
            "full" if full else "partial",
            dataset,
            subject,
            result.rows,
            result.created,
            result.updated,
            result.deleted,
        )
        return await json_response(request, asdict(result))

    # Devices

    async def changes(self, request: web.Request) -> web.StreamResponse:
        """The row changes after `since`, at most `limit` of them (the setting
        `reference_page` is both the default and the maximum), and `next`, the `since` to ask
        for next; `more` says the next page is already waiting."""
        dataset = self._readable(request)
        since = _since(request)
        limit = page_size(request, self._page, self._page)
        try:
            page = await self.store.changes(dataset, since, limit)
        except ResyncRequired as exc:
            raise FieldsyncError(
                ErrorCode.RESYNC_REQUIRED,
                f"the changes of {dataset} since {since} are no longer kept: download the"
                " snapshot, then ask for the changes since its seq",
                dataset=dataset,
                horizon=exc.horizon,
                snapshot=REFERENCE.format(dataset=dataset) + "/snapshot",
            ) from None
        return await json_response(request, _page_json(page))

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        """Every row of the dataset as JSON lines: first `{"dataset", "seq", "rows"}`, then one
        `{"key", "row"}` per row, by key. The rows are exactly those at `seq`."""
        dataset = self._readable(request)
        coding = choose_coding(request.headers.get(hdrs.ACCEPT_ENCODING))
        # A client that takes no coding is sent the gzip build inflated on the way out:
        # memory holds compressed snapshots only.
        built = await self._snapshot(dataset, coding or "gzip")
        headers = {
            hdrs.ETAG: f'W/"{dataset}.{built.seq}"',
            hdrs.VARY: hdrs.ACCEPT_ENCODING,
            hdrs.CACHE_CONTROL: "private, no-cache",
        }
        if etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), headers[hdrs.ETAG]):
            return web.Response(status=304, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_type = NDJSON
        if coding is not None:
            response.headers[hdrs.CONTENT_ENCODING] = coding
            response.content_length = len(built.body)
        else:
            response.content_length = built.size
        await response.prepare(request)
        if request.method != hdrs.METH_HEAD:
            for chunk in _slices(built.body) if coding else _inflated(built.body):
                await response.write(chunk)
        await response.write_eof()
        return response

    def _readable(self, request: web.Request) -> str:
        dataset = request.match_info["dataset"]
        if dataset not in self._policy().datasets(request[PRINCIPAL]):
            raise FieldsyncError(ErrorCode.FORBIDDEN, "no such dataset for your role")
        return dataset

    async def _snapshot(self, dataset: str, coding: str) -> _Snapshot:
        # One build at a time per dataset and coding: the devices asking meanwhile wait for it
        # rather than each reading the whole dataset.
        async with self._building.setdefault((dataset, coding), asyncio.Lock()):
            info = await self.store.info(dataset)
            changed = info.seq if info else 0
            cached = self._snapshots.get((dataset, coding))
            if cached is not None and cached.changed == changed:
                return cached
            built = await self.store.snapshot(
                dataset, lambda head, rows: _build(head, rows, _streaming(coding), changed)
            )
            self._snapshots[dataset, coding] = built
            return built


def _build(
    head: SnapshotHead, rows: Iterator[tuple[str, str]], stream: _Compressor, changed: int
) -> _Snapshot:
    """Runs on the store's reader thread, inside the snapshot's read transaction. Rows are
    spliced from their stored JSON text: nothing is parsed."""
    header = orjson.dumps({"dataset": head.dataset, "seq": head.seq, "rows": head.rows}) + b"\n"
    parts = [stream.compress(header)]
    size = len(header)
    batch: list[bytes] = []
    for key, data in rows:
        batch.append(b'{"key":' + orjson.dumps(key) + b',"row":' + data.encode() + b"}\n")
        if len(batch) == _BUILD_BATCH:
            text = b"".join(batch)
            size += len(text)
            parts.append(stream.compress(text))
            batch.clear()
    text = b"".join(batch)
    size += len(text)
    parts.extend((stream.compress(text), stream.flush()))
    # `changed` was read before this snapshot: a row change committed in between makes the
    # build newer than it says, and the next request merely builds again.
    return _Snapshot(changed, head.seq, head.rows, size, b"".join(parts))


def _slices(body: bytes) -> Iterator[bytes]:
    view = memoryview(body)
    for offset in range(0, len(view), _SLICE):
        yield bytes(view[offset : offset + _SLICE])


def _inflated(body: bytes) -> Iterator[bytes]:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for chunk in _slices(body):
        yield inflate.decompress(chunk)
    yield inflate.flush()


async def _json_lines(stream: StreamReader) -> AsyncIterator[Any]:
    """The rows of a JSON lines body; blank lines are skipped, and rows are counted from 1.

    Read in chunks and split here rather than line by line through the stream: a million
    `readline` awaits cost more than parsing the rows."""
    row = 0
    tail = b""
    async for chunk in stream.iter_chunked(_SLICE):
        *lines, tail = (tail + chunk).split(b"\n")
        if len(tail) > _MAX_ROW_BYTES:
            raise InvalidRow(f"row {row + 1}: longer than {_MAX_ROW_BYTES} bytes")
        for line in lines:
            if line.strip():
                row += 1
                yield _parsed(line, row)
    if tail.strip():
        yield _parsed(tail, row + 1)


def _parsed(line: bytes, row: int) -> Any:
    if len(line) > _MAX_ROW_BYTES:
        raise InvalidRow(f"row {row}: longer than {_MAX_ROW_BYTES} bytes")
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidRow(f"row {row}: not JSON ({exc})") from None


def _since(request: web.Request) -> int:
    raw = request.query.get("since", "0")
    if not (raw.isascii() and raw.isdigit()):
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, "since must be a change sequence >= 0")
    return int(raw)


def _page_json(page: ReferencePage) -> dict[str, Any]:
    return {
        "dataset": page.dataset,
        "since": page.since,
        "next": page.next,
        "more": page.more,
        "changes": [_change_json(change) for change in page.changes],
        "deleted": page.deleted,
    }


def _change_json(change: RowChange) -> dict[str, Any]:
    """`{"key", "row"}`: the whole row, replacing what the device holds (it was created, or
    re-created after a delete); `{"key", "set", "unset"?}`: new values of some fields, and
    fields that no longer exist."""
    if change.whole:
        return {"key": change.key, "row": change.fields}
    body: dict[str, Any] = {"key": change.key, "set": change.fields}
    if change.removed:
        body["unset"] = list(change.removed)
    return body
