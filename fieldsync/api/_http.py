"""How the REST screens answer (DESIGN.md §5): JSON with a validator for revalidation, compressed
for the link it travels, and errors as problem documents.

Devices on metered links pay for every byte, so every answer carries an `ETag` and a device that
still holds the same content gets `304 Not Modified` with no body (RFC 9110 §13.1.2, §15.4.5);
what does travel is compressed with the best coding the client accepts (br, zstd, gzip).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import brotli
import orjson
import zstandard
from aiohttp import hdrs, web

from fieldsync.api._problems import problem
from fieldsync.errors import FieldsyncError

__all__ = ["CODINGS", "MIN_COMPRESSED", "choose_coding", "etag_matches", "json_response", "rest"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Below this a body goes as it is: a coding's own framing (gzip's 18 bytes, a zstd frame
# header) eats most of what it would save on a few hundred bytes, and a problem document or an
# empty page is that small.
MIN_COMPRESSED = 512
# Above this the compression runs on a worker thread, not on the event loop (a few ms at most
# for the largest page, but every other connection would wait for them).
_OFF_LOOP = 64 * 1024

# Levels chosen for small JSON compressed per request: within a few percent of the best ratio
# at a fraction of the time (brotli 11 is ~10x slower for ~10% fewer bytes on a page of cards).
_BROTLI_QUALITY = 5
_ZSTD_LEVEL = 6
_GZIP_LEVEL = 6


def _brotli(body: bytes) -> bytes:
    return bytes(brotli.compress(body, quality=_BROTLI_QUALITY))


def _zstd(body: bytes) -> bytes:
    # RFC 9659 §3: an HTTP zstd body must decode with a window of at most 8 MB; at this level
    # the window is far smaller, and the content size is written so decoders can size buffers.
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True).compress(body)


def _gzip(body: bytes) -> bytes:
    # mtime=0: the same content gives the same bytes.
    return gzip.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)


# In the server's order of preference, used when the client weighs several alike: brotli gives
# the smallest JSON, zstd is nearly as small and faster, gzip is what every client has.
CODINGS: Mapping[str, Callable[[bytes], bytes]] = {"br": _brotli, "zstd": _zstd, "gzip": _gzip}


def choose_coding(accept_encoding: str | None) -> str | None:
    """The content coding to answer with under `Accept-Encoding` (RFC 9110 §12.5.3), None for
    the body as it is. `x-gzip` is gzip (§8.4.1.3); `*` covers the codings not named; a coding
    weighted 0 is never chosen."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, parameters = item.partition(";")
        name = name.strip().lower()
        if name == "x-gzip":
            name = "gzip"
        if not name:
            continue
        weight = 1.0
        for parameter in parameters.split(";"):
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    weight = 0.0  # a malformed weight accepts nothing rather than everything
        weights[name] = max(weight, weights.get(name, 0.0))
    default = weights.get("*", 0.0)
    best, best_weight = None, 0.0
    for coding in CODINGS:
        weight = weights.get(coding, default)
        if weight > best_weight:
            best, best_weight = coding, weight
    # Identity is acceptable unless excluded, but preferred only when weighed above the rest.
    if best is not None and weights.get("identity", 0.0) > best_weight:
        return None
    return best


def _etag(body: bytes) -> str:
    # Weak (RFC 9110 §8.8.1): one validator for the content whatever coding carries it, so a
    # device that switches between br and gzip still revalidates. Derived from the bytes, so
    # every node answers a given content with the same tag.
    digest = hashlib.blake2b(body, digest_size=16).digest()
    return 'W/"' + base64.urlsafe_b64encode(digest).rstrip(b"=").decode() + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: If-None-Match compares weakly (the `W/` prefix does not count), and
    `*` matches any current representation."""
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == opaque:
            return True
    return False


async def json_response(
    request: web.Request,
    payload: Any,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """`payload` as JSON, with its ETag; 304 without a body when a GET's `If-None-Match` names
    it; compressed by `Accept-Encoding` when it is large enough to gain."""
    # Sorted keys: the validator is derived from the bytes, and a document's maps (pycrdt's
    # `to_py`) come out in a different order from one read to the next.
    body = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    etag = _etag(body)
    common = {
        hdrs.ETAG: etag,
        # Compression makes the bytes depend on Accept-Encoding (RFC 9110 §12.5.5).
        hdrs.VARY: hdrs.ACCEPT_ENCODING,
        # Every answer is the caller's own view (its scope): a shared cache must not keep it,
        # and a private one revalidates each time, which the ETag makes a bodiless 304.
        hdrs.CACHE_CONTROL: "private, no-cache",
        **(headers or {}),
    }
    if (
        status == 200
        and request.method in (hdrs.METH_GET, hdrs.METH_HEAD)
        and etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), etag)
    ):
        return web.Response(status=304, headers=common)
    coding = choose_coding(request.headers.get(hdrs.ACCEPT_ENCODING))
    if coding is not None and len(body) >= MIN_COMPRESSED:
        compress = CODINGS[coding]
        body = await asyncio.to_thread(compress, body) if len(body) > _OFF_LOOP else compress(body)
        common[hdrs.CONTENT_ENCODING] = coding
    return web.Response(body=body, status=status, content_type="application/json", headers=common)


def rest(handler: Handler) -> Handler:
    """Answer a handler's `FieldsyncError` with its RFC 9457 problem document: handlers raise the
    error vocabulary (`fieldsync.errors`) and never build error responses themselves."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except FieldsyncError as error:
            return problem(error.code, error.message, **error.detail)

    return answer
