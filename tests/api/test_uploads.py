"""Attachments against a real server: tus 1.0 uploads (core, creation, checksum, termination),
content verified and stored once, types read from the bytes, image bombs refused, downloads with
ranges for whoever sees the work order, thumbnails for supervisors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from PIL import Image
from pycrdt import Doc, Map

from fieldsync.api._downloads import RangeNotSatisfiable, byte_range
from fieldsync.app import ATTACHMENTS
from fieldsync.auth import DevIssuer, Principal, Role
from fieldsync.config import ConfigError, Settings
from tests.harness import Server, eventually, png, running_server, work_order
from tests.wire import connect

TUS = {"Tus-Resumable": "1.0.0"}
PATCH_TYPE = {"Content-Type": "application/offset+octet-stream"}


# --- content to send ----------------------------------------------------------------------------


def jpeg(width: int = 1600, height: int = 1200, seed: int = 0) -> bytes:
    """A photo-like JPEG of several hundred KiB (noise compresses badly, as a real scene does)."""
    noise = random.Random(seed).randbytes(width * height * 3 // 16)
    image = Image.frombytes("RGB", (width // 4, height // 4), noise).resize((width, height))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a 1-bit `side` by `side` PNG of zeros, a few KiB that decode to
    `side`² pixels (RFC 2083: signature, IHDR, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + (side + 7) // 8)  # filter type 0, then the packed bits
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * side, 9))
        + chunk(b"IEND", b"")
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# --- a tus client -------------------------------------------------------------------------------


class Tus:
    """What a device's tus client sends, request by request, so each answer can be checked."""

    def __init__(self, server: Server, http: aiohttp.ClientSession, subject: str) -> None:
        self.server = server
        self.http = http
        self.subject = subject
        self.headers = {"Authorization": f"Bearer {server.token(subject)}", **TUS}

    def url(self, location: str) -> str:
        return location if location.startswith("http") else self.server.url + location

    async def create(
        self, data: bytes, wo: str, *, declared: str | None = None, **meta: str
    ) -> aiohttp.ClientResponse:
        metadata = {"sha256": declared or sha256(data), "work_order": wo, **meta}
        headers = {
            **self.headers,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": ",".join(f"{k} {b64(v)}" for k, v in metadata.items()),
        }
        async with self.http.post(self.server.url + "/v1/uploads", headers=headers) as response:
            await response.read()
            return response

    async def created(self, data: bytes, wo: str, **options: Any) -> str:
        response = await self.create(data, wo, **options)
        assert response.status == 201, await _problem(response)
        return response.headers["Location"]

    async def head(self, location: str) -> tuple[int, CIMultiDictProxy[str]]:
        async with self.http.head(self.url(location), headers=self.headers) as response:
            return response.status, response.headers

    async def offset(self, location: str) -> int:
        status, headers = await self.head(location)
        assert status == 200
        return int(headers["Upload-Offset"])

    async def patch(
        self, location: str, offset: int, data: bytes, checksum: str | None = "sha256"
    ) -> aiohttp.ClientResponse:
        headers = {**self.headers, **PATCH_TYPE, "Upload-Offset": str(offset)}
        if checksum is not None:
            headers["Upload-Checksum"] = f"{checksum} {b64(hashlib.new(checksum, data).digest())}"
        async with self.http.patch(self.url(location), headers=headers, data=data) as response:
            response.body = await response.read()  # type: ignore[attr-defined]
            return response

    async def upload(self, data: bytes, wo: str, chunk: int = 256 * 1024, **meta: str) -> str:
        """The whole flow; returns the content's download path."""
        location = await self.created(data, wo, **meta)
        offset = await self.offset(location)
        while offset < len(data):
            response = await self.patch(location, offset, data[offset : offset + chunk])
            assert response.status == 204, response.body  # type: ignore[attr-defined]
            offset = int(response.headers["Upload-Offset"])
        return f"/v1/attachments/{sha256(data)}"

    async def get(self, path: str, **headers: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
        request_headers = {"Authorization": self.headers["Authorization"], **headers}
        async with self.http.get(self.url(path), headers=request_headers) as response:
            return response.status, response.headers, await response.read()


async def _problem(response: aiohttp.ClientResponse) -> str:
    return f"{response.status} {response.headers.get('Content-Type')}"


async def seed(server: Server, *orders: tuple[str, dict[str, Any]]) -> None:
    """Work orders created by their supervisor's device, committed before the test goes on."""
    for doc_id, fields in orders:
        supervisor = "sue" if fields.get("team") == "south" else "sam"
        async with connect(server.sync_url, server.token(supervisor)) as wire:
            await wire.hello()
            await wire.update(doc_id, work_order(doc_id, **fields).get_update())
            await wire.control("ack", doc=doc_id)


@pytest.fixture
async def seeded(server: Server) -> Server:
    await seed(
        server,
        ("wo:p1", {"assignee": "tina", "team": "north", "region": "east"}),
        ("wo:p2", {"assignee": "ulla", "team": "south", "region": "west"}),
    )
    return server


def stored_files(server: Server) -> list[Path]:
    """Content on disk: `<data_dir>/attachments/ab/cdef…` (README "Attachments")."""
    root = server.data_dir / "attachments"
    return sorted(p for p in root.glob("??/*") if p.is_file())


def staged_files(server: Server) -> list[Path]:
    return sorted((server.data_dir / "attachments" / "staging").iterdir())


# --- the protocol -------------------------------------------------------------------------------


async def test_options_says_what_the_server_speaks_without_a_token(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.options(server.url + "/v1/uploads") as response:
        assert response.status == 204
        headers = response.headers
    assert headers["Tus-Version"] == "1.0.0"
    assert set(headers["Tus-Extension"].split(",")) == {"creation", "checksum", "termination"}
    assert int(headers["Tus-Max-Size"]) == 32 << 20
    assert {"sha1", "sha256"} <= set(headers["Tus-Checksum-Algorithm"].split(","))


async def test_the_full_flow_stores_verified_content_and_serves_it(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    photo = jpeg()
    location = await tina.created(photo, "wo:p1", filename="pump.jpg", filetype="image/jpeg")
    assert location.startswith("/v1/uploads/")
    status, headers = await tina.head(location)
    assert status == 200
    assert headers["Tus-Resumable"] == "1.0.0"
    assert (headers["Upload-Offset"], headers["Upload-Length"]) == ("0", str(len(photo)))
    assert headers["Cache-Control"] == "no-store"
    assert "filename" in headers["Upload-Metadata"]

    half = len(photo) // 2
    first = await tina.patch(location, 0, photo[:half])
    assert (first.status, first.headers["Upload-Offset"]) == (204, str(half))
    # Partial content is never visible: not at its address, not on disk beside the content.
    assert (await tina.get(f"/v1/attachments/{sha256(photo)}"))[0] == 403
    assert stored_files(seeded) == []
    last = await tina.patch(location, half, photo[half:], checksum="sha1")
    assert (last.status, last.headers["Upload-Offset"]) == (204, str(len(photo)))

    status, headers, body = await tina.get(f"/v1/attachments/{sha256(photo)}")
    assert status == 200
    assert body == photo
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["ETag"] == f'"{sha256(photo)}"'
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Stored once, content-addressed, and the staging area is empty again.
    [stored] = stored_files(seeded)
    assert stored.relative_to(seeded.data_dir / "attachments").as_posix() == (
        f"{sha256(photo)[:2]}/{sha256(photo)[2:]}"
    )
    assert stored.read_bytes() == photo
    assert staged_files(seeded) == []
    # GET on the upload tells the same as HEAD, as JSON.
    status, _, body = await tina.get(location, **TUS)
    assert status == 200
    assert json.loads(body) | {"id": None} == {
        "id": None,
        "work_order": "wo:p1",
        "sha256": sha256(photo),
        "offset": len(photo),
        "length": len(photo),
        "complete": True,
        "attachment": f"/v1/attachments/{sha256(photo)}",
    }


async def test_an_interrupted_upload_resumes_from_the_offset_head_gives(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    photo = jpeg(seed=1)
    sent = 600_000
    assert len(photo) > sent
    location = await tina.created(photo, "wo:p1")
    [staged] = staged_files(seeded)

    class Cut(Exception):
        pass

    async def network_drops() -> AsyncIterator[bytes]:
        yield photo[:sent]
        # The device loses its network mid-chunk, once the server has written some of it.
        await eventually(lambda: staged.stat().st_size >= 256 * 1024)
        raise Cut

    headers = {
        **tina.headers,
        **PATCH_TYPE,
        "Upload-Offset": "0",
        "Content-Length": str(len(photo)),
    }
    with pytest.raises((Cut, aiohttp.ClientError)):
        async with http.patch(tina.url(location), headers=headers, data=network_drops()):
            pass

    # The server keeps what arrived (tus 1.0: "store as much of the received data as possible")
    # once it notices the cut; HEAD says the offset durably recorded, 0 until then.
    async with asyncio.timeout(10):
        while (offset := await tina.offset(location)) == 0:  # noqa: ASYNC110 - over HTTP
            await asyncio.sleep(0.005)
    assert 256 * 1024 <= offset <= sent
    # Resuming anywhere else is refused, with where to resume.
    stale = await tina.patch(location, 0, photo)
    assert stale.status == 409
    resumed = await tina.patch(location, offset, photo[offset:])
    assert (resumed.status, resumed.headers["Upload-Offset"]) == (204, str(len(photo)))
    assert (await tina.get(f"/v1/attachments/{sha256(photo)}"))[2] == photo


async def test_a_chunk_that_does_not_match_its_checksum_is_refused_with_460(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    photo = png()
    location = await tina.created(photo, "wo:p1")
    headers = {
        **tina.headers,
        **PATCH_TYPE,
        "Upload-Offset": "0",
        "Upload-Checksum": f"sha256 {b64(hashlib.sha256(b'something else').digest())}",
    }
    async with http.patch(tina.url(location), headers=headers, data=photo) as response:
        assert (response.status, response.reason) == (460, "Checksum Mismatch")
        assert (await response.json(content_type=None))["code"] == "checksum_mismatch"
        assert response.headers["Tus-Resumable"] == "1.0.0"
    assert await tina.offset(location) == 0  # the chunk was dropped, the upload stays
    # An algorithm the server does not offer is a 400 (tus 1.0 checksum extension).
    headers["Upload-Checksum"] = f"md5 {b64(hashlib.md5(photo).digest())}"
    async with http.patch(tina.url(location), headers=headers, data=photo) as response:
        assert response.status == 400
    assert (await tina.patch(location, 0, photo)).status == 204


async def test_content_that_does_not_match_its_sha256_is_refused_and_never_visible(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    photo, claimed = png(color="red"), png(color="blue")
    location = await tina.created(photo, "wo:p1", declared=sha256(claimed))
    response = await tina.patch(location, 0, photo)  # the chunk itself is intact
    assert response.status == 460
    assert b"declared" in response.body  # type: ignore[attr-defined]
    assert (await tina.head(location))[0] == 403  # the upload is gone
    for digest in (sha256(photo), sha256(claimed)):
        assert (await tina.get(f"/v1/attachments/{digest}"))[0] == 403
    assert stored_files(seeded) == []
    assert staged_files(seeded) == []


async def test_the_same_content_is_stored_once_however_often_it_is_sent(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina, ulla = Tus(seeded, http, "tina"), Tus(seeded, http, "ulla")
    photo = jpeg(seed=2)
    await tina.upload(photo, "wo:p1")
    # A device resending (its answer was lost): complete at creation, nothing to send.
    again = await tina.create(photo, "wo:p1")
    assert again.status == 201
    assert again.headers["Upload-Offset"] == str(len(photo))
    assert await tina.offset(again.headers["Location"]) == len(photo)
    # Someone who cannot read it yet must send the bytes: knowing a hash grants nothing.
    other = await ulla.created(photo, "wo:p2")
    assert await ulla.offset(other) == 0
    assert (await ulla.get(f"/v1/attachments/{sha256(photo)}"))[0] == 403
    assert (await ulla.patch(other, 0, photo)).status == 204
    # …and then reads it through her own work order; the content is still on disk once.
    assert (await ulla.get(f"/v1/attachments/{sha256(photo)}"))[2] == photo
    assert len(stored_files(seeded)) == 1
    assert staged_files(seeded) == []


async def test_the_type_is_read_from_the_bytes_not_the_name(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    signature = png(300, 100, "white")
    await tina.upload(signature, "wo:p1", filename="signature.jpg", filetype="image/jpeg")
    status, headers, _ = await tina.get(f"/v1/attachments/{sha256(signature)}")
    assert (status, headers["Content-Type"]) == (200, "image/png")

    # A type fieldsync knows but this server does not accept (attachment_types).
    webp = io.BytesIO()
    Image.new("RGB", (64, 64), "navy").save(webp, "WEBP")
    location = await tina.created(webp.getvalue(), "wo:p1", filetype="image/png")
    refused = await tina.patch(location, 0, webp.getvalue())
    assert refused.status == 415
    assert b"image/webp" in refused.body  # type: ignore[attr-defined]

    text = b"just some notes, not a photo at all\n" * 10
    location = await tina.created(text, "wo:p1", filename="photo.jpg", filetype="image/jpeg")
    refused = await tina.patch(location, 0, text[:64])  # refused from its first bytes
    assert refused.status == 415
    assert b"unsupported_media_type" in refused.body  # type: ignore[attr-defined]
    assert (await tina.head(location))[0] == 403
    assert staged_files(seeded) == []


async def test_a_patch_body_must_be_an_offset_stream(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    location = await tina.created(png(), "wo:p1")
    headers = {**tina.headers, "Upload-Offset": "0", "Content-Type": "image/png"}
    async with http.patch(tina.url(location), headers=headers, data=png()) as response:
        assert response.status == 415


@pytest.fixture
async def small(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    async with running_server(
        tmp_path / "small", issuer, attachment_max_bytes=100_000, attachment_max_pixels=1_000_000
    ) as server:
        await seed(server, ("wo:p1", {"assignee": "tina", "team": "north", "region": "east"}))
        yield server


async def test_uploads_over_the_size_limit_get_413(
    small: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(small, http, "tina")
    too_big = await tina.create(b"\xff\xd8\xff" + bytes(100_000), "wo:p1")
    assert too_big.status == 413
    assert too_big.headers["Tus-Resumable"] == "1.0.0"
    # A chunk past the upload's own length is refused too, and nothing of it counts.
    photo = png()
    location = await tina.created(photo, "wo:p1")
    assert (await tina.patch(location, 0, photo + b"extra")).status == 413
    assert await tina.offset(location) == 0


@pytest.mark.parametrize(
    ("side", "which"),
    [(1200, "this server's attachment_max_pixels"), (12_000, "Pillow's own limit too")],
)
async def test_a_decompression_bomb_is_refused_before_it_is_decoded(
    small: Server, http: aiohttp.ClientSession, side: int, which: str
) -> None:
    tina = Tus(small, http, "tina")
    bomb = bomb_png(side)
    assert len(bomb) < 100_000 < side * side  # small on the wire, huge in memory
    location = await tina.created(bomb, "wo:p1")
    refused = await tina.patch(location, 0, bomb)
    assert refused.status == 422, which
    assert b"image_too_large" in refused.body  # type: ignore[attr-defined]
    assert (await tina.get(f"/v1/attachments/{sha256(bomb)}"))[0] == 403
    assert stored_files(small) == []
    assert staged_files(small) == []


# --- downloads ----------------------------------------------------------------------------------


async def test_range_downloads(seeded: Server, http: aiohttp.ClientSession) -> None:
    tina = Tus(seeded, http, "tina")
    photo = jpeg(seed=3)
    path = await tina.upload(photo, "wo:p1")
    size = len(photo)

    status, headers, body = await tina.get(path, Range="bytes=0-99")
    assert (status, body) == (206, photo[:100])
    assert headers["Content-Range"] == f"bytes 0-99/{size}"
    status, headers, body = await tina.get(path, Range="bytes=-500")
    assert (status, body) == (206, photo[-500:])
    assert headers["Content-Range"] == f"bytes {size - 500}-{size - 1}/{size}"
    status, _, body = await tina.get(path, Range=f"bytes={size - 10}-")
    assert (status, body) == (206, photo[-10:])
    status, headers, _ = await tina.get(path, Range=f"bytes={size}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"
    # If-Range naming another version: the whole content (RFC 9110 §13.1.5).
    status, _, body = await tina.get(path, Range="bytes=0-9", **{"If-Range": '"other"'})
    assert (status, body) == (200, photo)
    status, _, body = await tina.get(path, Range="bytes=0-9", **{"If-Range": f'"{sha256(photo)}"'})
    assert (status, body) == (206, photo[:10])
    # HEAD: the same headers, no content (RFC 9110 §9.3.2).
    async with http.head(
        tina.url(path), headers={"Authorization": tina.headers["Authorization"]}
    ) as r:
        assert (r.status, r.headers["Content-Length"], await r.read()) == (200, str(size), b"")
    # A revalidation costs no body.
    status, _, body = await tina.get(path, **{"If-None-Match": f'"{sha256(photo)}"'})
    assert (status, body) == (304, b"")


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-0", 100, (0, 0)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=90-200", 100, (90, 99)),
        ("bytes=-30", 100, (70, 99)),
        ("bytes=-300", 100, (0, 99)),
        ("BYTES = 5-6", 100, (5, 6)),
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole content
        ("items=0-1", 100, None),  # another unit: ignored
        ("bytes=9-3", 100, None),  # invalid: ignored
        ("bytes=abc", 100, None),
        ("bytes=100-", 100, RangeNotSatisfiable),
        ("bytes=-0", 100, RangeNotSatisfiable),
    ],
)
def test_byte_ranges_follow_rfc_9110(
    header: str | None, size: int, expected: tuple[int, int] | type[Exception] | None
) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            byte_range(header, size)
    else:
        assert byte_range(header, size) == expected


async def test_downloads_need_a_work_order_in_scope(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    photo = png(color="orange")
    path = await Tus(seeded, http, "tina").upload(photo, "wo:p1")
    # Tina's team (her supervisor, their manager, the admin) see wo:p1; Tom (a technician of
    # the same team, not assigned) and Ulla (another team) do not. An unknown hash and a hash
    # out of scope answer alike.
    for subject in ("tina", "sam", "mia", "ada"):
        assert (await Tus(seeded, http, subject).get(path))[0] == 200, subject
    for subject in ("tom", "ulla", "sue", "nobody"):
        status, _, body = await Tus(seeded, http, subject).get(path)
        assert status == 403, subject
        assert b'"code":"forbidden"' in body, subject
    unknown = await Tus(seeded, http, "tina").get(f"/v1/attachments/{'0' * 64}")
    assert unknown[0] == 403
    assert b'"code":"forbidden"' in unknown[2]
    async with http.get(seeded.url + path) as anonymous:
        assert anonymous.status == 401


async def test_thumbnails_for_supervisors_and_above(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    photo = jpeg(1600, 1200, seed=4)
    path = await Tus(seeded, http, "tina").upload(photo, "wo:p1")
    sam = Tus(seeded, http, "sam")
    status, headers, body = await sam.get(path + "/thumbnail")
    assert (status, headers["Content-Type"]) == (200, "image/jpeg")
    with Image.open(io.BytesIO(body)) as thumbnail:
        assert thumbnail.format == "JPEG"
        assert max(thumbnail.size) == 256
        assert thumbnail.size == (256, 192)
    assert len(body) < len(photo) // 10
    # Made once, then served from the cache on disk.
    cached = seeded.data_dir / "attachments" / "thumbnails" / sha256(photo)[:2]
    assert [p.name for p in cached.iterdir()] == [f"{sha256(photo)[2:]}.jpg"]
    assert (await Tus(seeded, http, "mia").get(path + "/thumbnail"))[2] == body
    status, _, body = await Tus(seeded, http, "tina").get(path + "/thumbnail")
    assert status == 403
    assert b'"code":"forbidden"' in body
    assert (await Tus(seeded, http, "sue").get(path + "/thumbnail"))[0] == 403  # other team
    # A signed PDF is content like a photo, but has no thumbnail.
    pdf = b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    pdf_path = await Tus(seeded, http, "tina").upload(pdf, "wo:p1", filename="signature.pdf")
    status, headers, body = await sam.get(pdf_path)
    assert (status, headers["Content-Type"], body) == (200, "application/pdf", pdf)
    status, _, body = await sam.get(pdf_path + "/thumbnail")
    assert status == 404
    assert b'"code":"no_thumbnail"' in body


async def test_termination_deletes_the_upload_and_its_bytes(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    photo = jpeg(seed=5)
    location = await tina.created(photo, "wo:p1")
    assert (await tina.patch(location, 0, photo[:1000])).status == 204
    assert len(staged_files(seeded)) == 1
    # Another principal cannot terminate it (nor see it): 403, as for an upload that is gone.
    tom = Tus(seeded, http, "tom")
    async with http.delete(tom.url(location), headers=tom.headers) as response:
        assert response.status == 403
    assert (await tom.head(location))[0] == 403
    async with http.delete(tina.url(location), headers=tina.headers) as response:
        assert response.status == 204
        assert response.headers["Tus-Resumable"] == "1.0.0"
    assert (await tina.head(location))[0] == 403
    assert (await tina.patch(location, 1000, photo[1000:])).status == 403
    assert staged_files(seeded) == []
    assert stored_files(seeded) == []


async def test_creating_an_upload_needs_a_work_order_to_attach_to(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    photo = png()
    tina, ulla = Tus(seeded, http, "tina"), Tus(seeded, http, "ulla")
    assert (await ulla.create(photo, "wo:p1")).status == 403  # not in her scope
    assert (await tina.create(photo, "wo:nowhere")).status == 403  # absent alike
    assert (await tina.create(photo, "form:f1")).status == 403  # not a work order
    no_order = {**tina.headers, "Upload-Length": "10", "Upload-Metadata": f"sha256 {b64('0' * 64)}"}
    async with http.post(seeded.url + "/v1/uploads", headers=no_order) as response:
        assert response.status == 400
        assert (await response.json(content_type=None))["code"] == "invalid_request"
    # tus 1.0 core: a request without a version the server speaks gets 412 and Tus-Version.
    old = {**tina.headers, "Tus-Resumable": "0.2.2", "Upload-Length": "10"}
    async with http.post(seeded.url + "/v1/uploads", headers=old) as response:
        assert response.status == 412
        assert response.headers["Tus-Version"] == "1.0.0"


# --- references from documents ------------------------------------------------------------------


async def test_unknown_or_unfinished_references_are_flagged_not_dropped(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    tina = Tus(seeded, http, "tina")
    stored, unfinished = png(color="green"), jpeg(seed=6)
    await tina.upload(stored, "wo:p1")
    location = await tina.created(unfinished, "wo:p1")
    assert (await tina.patch(location, 0, unfinished[:5000])).status == 204

    doc: Doc[Any] = Doc()
    attachments = doc.get("attachments", type=Map)
    meta = {"mime": "image/jpeg", "size": 1, "caption": "", "by": "tina", "at": "2026-11-30"}
    for key in (sha256(stored), sha256(unfinished), "f" * 64, "not-a-hash"):
        attachments[key] = Map(meta)
    service = seeded.app[ATTACHMENTS]
    tina_principal = Principal("tina", frozenset({Role.TECHNICIAN}), "north", "east")
    assert await service.unresolved_attachments(tina_principal, doc) == sorted(
        [sha256(unfinished), "f" * 64, "not-a-hash"]
    )
    described = await service.describe(tina_principal, doc)
    assert len(described) == 4
    assert described[sha256(stored)] == {**meta, "missing": False}
    assert described[sha256(unfinished)]["missing"] is True
    assert await service.unresolved_attachments(tina_principal, Doc()) == []


async def screen_attachments(
    server: Server, http: aiohttp.ClientSession, subject: str, wo: str
) -> dict[str, bool]:
    """`missing` of each entry of the work order's `attachments`, as `subject`'s screen shows."""
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    async with http.get(f"{server.url}/v1/screens/work-order/{wo}", headers=headers) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return {entry["sha256"]: entry["missing"] for entry in body["attachments"]}


async def attach(server: Server, subject: str, wo: str, *hashes: str) -> None:
    """What a device does once a photo is taken: an entry in the work order's `attachments`."""
    doc: Doc[Any] = Doc()
    for digest in hashes:
        doc.get("attachments", type=Map)[digest] = Map({"mime": "image/png", "by": subject})
    async with connect(server.sync_url, server.token(subject)) as wire:
        await wire.hello()
        await wire.update(wo, doc.get_update())
        await wire.control("ack", doc=wo)


async def test_a_screen_never_tells_whether_content_it_may_not_read_is_stored(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    """Security finding 5: naming someone else's hash in one's own work order must not reveal
    that the content exists. `missing` is false only for content the caller may download."""
    tina, ulla = Tus(seeded, http, "tina"), Tus(seeded, http, "ulla")
    photo, never_sent = png(color="purple"), "e" * 64
    await tina.upload(photo, "wo:p1")
    await attach(seeded, "tina", "wo:p1", sha256(photo))
    # Ulla probes: her own work order names Tina's photo and a hash nobody stored.
    await attach(seeded, "ulla", "wo:p2", sha256(photo), never_sent)
    probe = await screen_attachments(seeded, http, "ulla", "wo:p2")
    assert probe == {sha256(photo): True, never_sent: True}  # alike: nothing to learn
    assert (await ulla.get(f"/v1/attachments/{sha256(photo)}"))[0] == 403  # as downloads say
    # Her supervisor sees wo:p2 but not wo:p1: missing for her too.
    assert await screen_attachments(seeded, http, "sue", "wo:p2") == probe
    # Whoever sees wo:p1 (Tina, Sam, the admin) sees the photo there and on wo:p2 alike.
    assert await screen_attachments(seeded, http, "tina", "wo:p1") == {sha256(photo): False}
    assert await screen_attachments(seeded, http, "ada", "wo:p2") == {
        sha256(photo): False,
        never_sent: True,
    }
    # Once Ulla sends the bytes for her work order, she may read them, and the screen says so.
    await ulla.upload(photo, "wo:p2")
    assert await screen_attachments(seeded, http, "ulla", "wo:p2") == {
        sha256(photo): False,
        never_sent: True,
    }


# --- settings -----------------------------------------------------------------------------------


def test_the_type_allow_list_names_only_types_fieldsync_recognises() -> None:
    settings = Settings.load(None, {"FIELDSYNC_ATTACHMENT_TYPES": " image/PNG , application/pdf"})
    assert settings.attachment_types == {"image/png", "application/pdf"}
    for bad in ("image/gif", "image/heic", ""):
        with pytest.raises(ConfigError, match="FIELDSYNC_ATTACHMENT_TYPES"):
            Settings.load(None, {"FIELDSYNC_ATTACHMENT_TYPES": bad})


async def test_an_upload_left_unfinished_expires_with_its_bytes(
    seeded: Server, http: aiohttp.ClientSession
) -> None:
    """A device that gave up leaves nothing behind for long: after `upload_expiry` untouched,
    the upload and its staged bytes go; finished content stays."""
    tina = Tus(seeded, http, "tina")
    photo, other = jpeg(seed=6), jpeg(seed=7)
    left = await tina.created(photo, "wo:p1")
    assert (await tina.patch(left, 0, photo[:1000])).status == 204
    done = await tina.created(other, "wo:p1")
    assert (await tina.patch(done, 0, other)).status == 204
    attachments = seeded.app[ATTACHMENTS]
    assert await attachments.expire() == 0  # a day is far off
    attachments.upload_expiry = 0.0
    assert await attachments.expire() == 1
    assert (await tina.head(left))[0] == 403  # as for a terminated upload
    assert staged_files(seeded) == []
    assert (await tina.get(f"/v1/attachments/{sha256(other)}"))[2] == other
