"""Security finding 4: thumbnails in bounded memory, measured on a real server process from
outside. A 250 KB PNG of 8000 x 8000 pixels decodes to 244 MiB; asked for by four supervisors at
once it took a server to 1.9 GiB. Now it gets a clear `no_thumbnail` at once, photos that do fit
are made one budget at a time, and a large JPEG is decoded at reduced scale."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import struct
import sys
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

import fieldsync
from fieldsync.auth import DevIssuer
from tests.harness import work_order
from tests.wire import connect

# What the server may grow by while it makes thumbnails: the default thumbnail memory (64 MiB)
# and room for everything else a request costs. Without the budget, the two renderers alone
# would hold twice 61 MiB for the PNGs that do fit; without the header check, one 8000 x 8000
# PNG held 490 MiB.
BOUND_MIB = 100
SUPERVISORS = 4


@dataclass
class ServerProcess:
    url: str
    pid: int
    issuer: DevIssuer

    def token(self, subject: str) -> str:
        return self.issuer.issue(subject)

    def memory_kib(self, field: str) -> int:
        """A field of the server's /proc status: VmRSS now, VmHWM its peak since the reset."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for process {self.pid}")

    def reset_peak(self) -> None:
        """The peak resident set size starts again from the current one (proc(5), clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@asynccontextmanager
async def server_process(data_dir: Path, issuer: DevIssuer) -> AsyncIterator[ServerProcess]:
    repository = Path(__file__).parents[2]  # where `tests` is importable from
    package = Path(fieldsync.__file__).parents[1]  # the fieldsync these tests import
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(package), str(repository), os.environ.get("PYTHONPATH", "")]
        ),
        "FIELDSYNC_DATA_DIR": str(data_dir),
        "FIELDSYNC_OIDC_ISSUER": issuer.issuer,
        "FIELDSYNC_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.attachments.serve",
        cwd=repository,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            url = (await process.stdout.readline()).decode().strip()
        assert url.startswith("http://"), f"the server did not start: {url!r}"
        yield ServerProcess(url, process.pid, issuer)
    finally:
        process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def plain_png(width: int, height: int, value: int) -> bytes:
    """An 8-bit RGB PNG of one colour, built row by row (RFC 2083) so the test never holds it
    decoded: a few hundred KB that decode to width x height x 4 bytes in Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = b"\x00" + bytes([value]) * (width * 3)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def large_jpeg(side: int) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).save(out, "JPEG", quality=80)
    return out.getvalue()


async def upload(http: aiohttp.ClientSession, server: ServerProcess, data: bytes) -> str:
    """A technician's tus upload in one chunk; returns the content's sha256."""
    digest = hashlib.sha256(data).hexdigest()
    meta = ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in (("sha256", digest), ("work_order", "wo:m1"))
    )
    headers = {"Authorization": f"Bearer {server.token('tina')}", "Tus-Resumable": "1.0.0"}
    create = {**headers, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    async with http.post(f"{server.url}/v1/uploads", headers=create) as created:
        assert created.status == 201, await created.text()
        location = created.headers["Location"]
    patch = {
        **headers,
        "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": "0",
    }
    async with http.patch(server.url + location, headers=patch, data=data) as sent:
        assert sent.status == 204, await sent.text()
    return digest


async def thumbnail(
    http: aiohttp.ClientSession, server: ServerProcess, digest: str
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {server.token('sam')}"}
    async with http.get(f"{server.url}/v1/attachments/{digest}/thumbnail", headers=headers) as r:
        return r.status, await r.read()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.slow
async def test_thumbnails_of_large_images_take_bounded_memory(
    tmp_path: Path, issuer: DevIssuer, http: aiohttp.ClientSession
) -> None:
    async with server_process(tmp_path / "data", issuer) as server:
        sync_url = server.url.replace("http", "ws", 1) + "/v1/sync"
        async with connect(sync_url, server.token("sam")) as wire:
            await wire.hello()
            await wire.update("wo:m1", work_order("wo:m1").get_update())
            await wire.control("ack", doc="wo:m1")
        huge = plain_png(8000, 8000, 200)
        assert len(huge) < 300_000  # the finding's 249 KB, under attachment_max_pixels
        huge_png = await upload(http, server, huge)
        # Four photos that do fit (4000 x 4000: 61 MiB decoded each), and a 64-megapixel JPEG.
        fitting = [await upload(http, server, plain_png(4000, 4000, 10 * n)) for n in range(4)]
        huge_jpeg = await upload(http, server, large_jpeg(8000))

        server.reset_peak()
        before = server.memory_kib("VmRSS")
        answers = await asyncio.gather(
            *(thumbnail(http, server, huge_png) for _ in range(SUPERVISORS)),
            *(thumbnail(http, server, digest) for digest in fitting),
            *(thumbnail(http, server, huge_jpeg) for _ in range(SUPERVISORS)),
        )
        growth_mib = (server.memory_kib("VmHWM") - before) / 1024
        assert growth_mib < BOUND_MIB, f"the server grew by {growth_mib:.0f} MiB"

        refused, made = answers[:SUPERVISORS], answers[SUPERVISORS:]
        for status, body in refused:
            assert status == 404
            assert b'"code":"no_thumbnail"' in body
            assert b"too large to thumbnail" in body
        for status, body in made:
            assert status == 200, body[:200]
            with Image.open(io.BytesIO(body)) as small:
                assert small.format == "JPEG"
                assert small.size == (256, 256)
