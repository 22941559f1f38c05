"""A device's copy of one reference dataset (asset registry, parts catalogue), kept current by
delta sync over REST: the changes since its last sync, or a snapshot when the server no longer
keeps them (410 `resync_required`).

The rows live in memory here; an app persists `rows` and `since` as it likes, and a replica
built from them continues where it stopped.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import brotli
import orjson
import zstandard

__all__ = ["ReferenceReplica", "ReferenceSync"]

_ACCEPT_ENCODING = "zstd, br;q=0.9, gzip;q=0.8"
# A snapshot that is itself overtaken by a compaction before the device asks for the changes
# after it needs a second snapshot; a third in a row means something else is wrong.
_MAX_SNAPSHOTS = 2


@dataclass(slots=True)
class ReferenceSync:
    """What one `sync` did: pages of changes read, whether it started over from a snapshot, and
    the bytes received as they travelled (compressed)."""

    pages: int = 0
    snapshots: int = 0
    changes_bytes: int = 0
    snapshot_bytes: int = 0


class ReferenceReplica:
    """`rows` by key and `since`, the change sequence they are current at (None: nothing yet, the
    first sync downloads the snapshot)."""

    def __init__(
        self,
        dataset: str,
        rows: Mapping[str, dict[str, Any]] | None = None,
        since: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.rows: dict[str, dict[str, Any]] = dict(rows or {})
        self.since = since

    def apply(self, page: Mapping[str, Any]) -> None:
        """Apply one page of `GET /v1/reference/{dataset}/changes` and move `since` on. Each key
        appears once in a page: deleted, replaced whole (`row`), or patched (`set`, `unset`)."""
        for key in page["deleted"]:
            self.rows.pop(key, None)
        for change in page["changes"]:
            key = change["key"]
            if "row" in change:
                self.rows[key] = dict(change["row"])
                continue
            row = self.rows.setdefault(key, {})
            row.update(change.get("set", {}))
            for field in change.get("unset", ()):
                row.pop(field, None)
        self.since = page["next"]

    def load(self, lines: Iterable[bytes]) -> None:
        """Replace everything with a snapshot's JSON lines (the header first)."""
        reader = _SnapshotReader()
        for line in lines:
            reader.feed(line + b"\n")
        self._take(reader)

    def _take(self, reader: _SnapshotReader) -> None:
        header = reader.finish()
        self.rows = reader.rows
        self.since = header["seq"]

    async def sync(
        self, http: aiohttp.ClientSession, base_url: str, token: str, *, limit: int | None = None
    ) -> ReferenceSync:
        """Bring the replica up to the server's present: pages of changes until `more` is
        false, starting over from a snapshot first when there is no `since` or the server
        answers 410. Raises `aiohttp.ClientResponseError` for any other refusal."""
        report = ReferenceSync()
        headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": _ACCEPT_ENCODING}
        url = f"{base_url.rstrip('/')}/v1/reference/{self.dataset}"
        while True:
            if self.since is None:
                if report.snapshots == _MAX_SNAPSHOTS:
                    raise RuntimeError(f"{self.dataset}: the snapshot is always already stale")
                report.snapshots += 1
                await self._download_snapshot(http, url + "/snapshot", headers, report)
            params = {"since": str(self.since)}
            if limit is not None:
                params["limit"] = str(limit)
            async with http.get(
                url + "/changes", params=params, headers=headers, auto_decompress=False
            ) as response:
                body = await response.read()
                if response.status == 410:
                    self.since = None
                    continue
                response.raise_for_status()
            report.pages += 1
            report.changes_bytes += len(body)
            page = orjson.loads(_decoded(body, response.headers.get("Content-Encoding")))
            self.apply(page)
            if not page["more"]:
                return report

    async def _download_snapshot(
        self,
        http: aiohttp.ClientSession,
        url: str,
        headers: Mapping[str, str],
        report: ReferenceSync,
    ) -> None:
        async with http.get(url, headers=headers, auto_decompress=False) as response:
            response.raise_for_status()
            decode = _Decoder(response.headers.get("Content-Encoding"))
            # Parsed as it arrives: what is held is the rows, never the whole text.
            reader = _SnapshotReader()
            async for chunk in response.content.iter_chunked(64 * 1024):
                report.snapshot_bytes += len(chunk)
                reader.feed(decode.decompress(chunk))
            reader.feed(decode.flush())
        self._take(reader)


class _Decoder:
    """Streaming decoding of one response body by its Content-Encoding."""

    def __init__(self, coding: str | None) -> None:
        self._zstd = self._zlib = self._brotli = None
        if coding == "zstd":
            self._zstd = zstandard.ZstdDecompressor().decompressobj()
        elif coding == "gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "br":
            self._brotli = brotli.Decompressor()
        elif coding not in (None, "identity"):
            raise ValueError(f"unexpected Content-Encoding {coding!r}")

    def decompress(self, data: bytes) -> bytes:
        if self._zstd is not None:
            return bytes(self._zstd.decompress(data))
        if self._zlib is not None:
            return self._zlib.decompress(data)
        if self._brotli is not None:
            return bytes(self._brotli.process(data))
        return data

    def flush(self) -> bytes:
        return self._zlib.flush() if self._zlib is not None else b""


def _decoded(body: bytes, coding: str | None) -> bytes:
    decoder = _Decoder(coding)
    return decoder.decompress(body) + decoder.flush()


class _SnapshotReader:
    """A snapshot's JSON lines, fed in pieces that may end mid-line."""

    def __init__(self) -> None:
        self.header: dict[str, Any] | None = None
        self.rows: dict[str, dict[str, Any]] = {}
        self._tail = b""

    def feed(self, data: bytes) -> None:
        *complete, self._tail = (self._tail + data).split(b"\n")
        for line in complete:
            self._line(line)

    def finish(self) -> dict[str, Any]:
        self._line(self._tail)
        self._tail = b""
        if self.header is None:
            raise ValueError("the snapshot has no header line")
        return self.header

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        item = orjson.loads(line)
        if self.header is None:
            self.header = item
        else:
            self.rows[item["key"]] = item["row"]
